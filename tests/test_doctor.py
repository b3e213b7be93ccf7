"""Tested-with versions: `skills doctor` flags stale skills and `--update` rewrites one line only."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from skillbook import catalog
from skillbook.catalog import frontmatter, versions
from skillbook.cli import main
from skillbook.errors import SkillbookError

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def copy_skills(tmp_path: Path, *names: str) -> Path:
    """A throwaway root with copies of fixture skills (doctor --update writes to SKILL.md)."""
    for name in names:
        shutil.copytree(FIXTURES / "skills" / name, tmp_path / "skills" / name)
    return tmp_path


def doctor(root: Path, *args: str):
    return CliRunner().invoke(main, ["doctor", *args], env={"SKILLBOOK_ROOT": str(root)})


def test_old_tested_with_is_reported_stale() -> None:
    status = versions.check(catalog.load_skill(FIXTURES / "skills" / "stale-example"))
    assert status.state == "stale"
    assert status.stale == {"click": ("0.1.0", version("click")), "pyyaml": ("3.10", version("pyyaml"))}
    assert "click 0.1.0 -> " + version("click") in status.describe()


def test_doctor_table_warns_and_strict_fails() -> None:
    res = doctor(FIXTURES)
    assert res.exit_code == 0, res.output  # stale is a warning by default ...
    row = next(line for line in res.output.splitlines() if line.startswith("stale-example"))
    assert row.split()[:3] == ["stale-example", "stale", "1/0"]
    assert "stale: stale-example" in res.output
    demo = next(line for line in res.output.splitlines() if line.startswith("example-demo"))
    assert demo.split()[1:3] == ["untested", "3/2"]  # executed/marked blocks per skill
    assert doctor(FIXTURES, "--strict").exit_code == 1  # ... and an error with --strict


def test_doctor_json_lists_versions_and_block_counts() -> None:
    res = doctor(FIXTURES, "stale-example", "--json")
    [row] = json.loads(res.output)
    assert row["state"] == "stale" and row["stale"]["click"] == {"tested": "0.1.0", "installed": version("click")}
    assert row["blocks"] == {"executed": 1, "marked": 0, "markers": {}, "smoke": 0}


def test_update_runs_examples_then_rewrites_only_that_line(tmp_path: Path) -> None:
    root = copy_skills(tmp_path, "stale-example")
    md = root / "skills" / "stale-example" / "SKILL.md"
    before = md.read_bytes()
    res = doctor(root, "--update", "stale-example")
    assert res.exit_code == 0, res.output
    after = md.read_bytes()
    spec = f"click=={version('click')} pyyaml=={version('pyyaml')}"
    assert after == before.replace(b'"click==0.1.0 pyyaml==3.10"', f'"{spec}"'.encode())
    skill = catalog.load_skill(md.parent)
    assert versions.check(skill).state == "ok" and skill.metadata["note"].startswith("keep this line")
    assert frontmatter.parse(after.decode()).problems == []
    assert doctor(root, "--strict").exit_code == 0


def test_update_refuses_when_an_example_fails(tmp_path: Path) -> None:
    root = copy_skills(tmp_path, "broken-example")
    md = root / "skills" / "broken-example" / "SKILL.md"
    before = md.read_bytes()
    res = doctor(root, "--update", "broken-example", "--package", "click")
    assert res.exit_code == 2
    assert "tested-with not updated" in res.output and "AttributeError" in res.output
    assert md.read_bytes() == before


def test_update_adds_the_line_when_missing(tmp_path: Path) -> None:
    root = copy_skills(tmp_path, "example-demo")
    md = root / "skills" / "example-demo" / "SKILL.md"
    before = md.read_text()
    res = doctor(root, "--update", "example-demo", "--no-run", "--package", "click")
    assert res.exit_code == 0, res.output
    after = md.read_text()
    line = f'  tested-with: "click=={version("click")}"'
    assert after == before.replace("  recipe: recipe.py\n", f"  recipe: recipe.py\n{line}\n")


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "---\nname: a\ndescription: b\n---\nbody\n",
            '---\nname: a\ndescription: b\nmetadata:\n  tested-with: "x==1"\n---\nbody\n',
        ),
        (
            "---\nname: a\nmetadata:\n    stage: data\n\nlicense: MIT\n---\n",
            '---\nname: a\nmetadata:\n    stage: data\n    tested-with: "x==1"\n\nlicense: MIT\n---\n',
        ),
        (
            "---\nmetadata:\n  tested-with: 'old==0'\n  stage: x\n---\n# tested-with: here\n",
            '---\nmetadata:\n  tested-with: "x==1"\n  stage: x\n---\n# tested-with: here\n',
        ),
    ],
)
def test_set_tested_with_touches_one_line(text: str, expected: str) -> None:
    assert versions.set_tested_with(text, "x==1") == expected


def test_spec_parsing() -> None:
    assert versions.parse("lm_eval==0.4.13 Llama_CPP.python==0.3.36") == {
        "lm-eval": "0.4.13",
        "llama-cpp-python": "0.3.36",
    }
    assert versions.parse("torch==2.13.0  trl==1.16.0") == {"torch": "2.13.0", "trl": "1.16.0"}
    assert versions.same("2.13.0", "2.13.0+cpu") and not versions.same("2.12.0", "2.13.0+cpu")
    with pytest.raises(SkillbookError, match="NAME==VERSION"):
        versions.parse("torch>=2")


def test_invalid_record_and_uninstalled_packages(tmp_path: Path) -> None:
    root = copy_skills(tmp_path, "stale-example")
    md = root / "skills" / "stale-example" / "SKILL.md"
    md.write_text(versions.set_tested_with(md.read_text(), "torch>=2"))
    assert versions.check(catalog.load_skill(md.parent)).state == "invalid"
    md.write_text(versions.set_tested_with(md.read_text(), f"click=={version('click')} no-such-dist==1.0"))
    status = versions.check(catalog.load_skill(md.parent))
    assert status.state == "ok" and status.missing == ["no-such-dist"]  # not installed here: reported, not stale


def test_used_packages_come_from_recipe_and_blocks(tmp_path: Path) -> None:
    root = copy_skills(tmp_path, "example-demo")
    md = root / "skills" / "example-demo" / "SKILL.md"
    md.write_text(md.read_text() + "\n```python fragment\nfrom trl import SFTTrainer\nimport peft\n```\n")
    assert versions.used_packages(catalog.load_skill(md.parent)) == ["peft", "torch", "trl"]


def test_lint_rule_flags_a_malformed_record(tmp_path: Path) -> None:
    from skillbook.lint import docs

    root = copy_skills(tmp_path, "stale-example")
    md = root / "skills" / "stale-example" / "SKILL.md"
    assert list(docs.rule_tested_with(catalog.load_skill(md.parent))) == []  # stale is not a lint error
    md.write_text(versions.set_tested_with(md.read_text(), "torch>=2"))
    [finding] = docs.rule_tested_with(catalog.load_skill(md.parent))
    assert finding.code == "SB207" and "NAME==VERSION" in finding.message


_YAML_WORDS = {"yes", "no", "on", "off", "true", "false", "null"}  # YAML would read these as bool/None
_word = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True).filter(lambda w: w not in _YAML_WORDS)


@settings(max_examples=60, deadline=None)
@given(
    meta=st.dictionaries(_word, _word, max_size=4),
    indent=st.sampled_from(["  ", "    "]),
    body=st.text(alphabet="ab #:-\n`", max_size=60),
)
def test_set_tested_with_keeps_every_other_byte(meta: dict, indent: str, body: str) -> None:
    meta = {k: v for k, v in meta.items() if k != versions.KEY}
    block = "".join(f"{indent}{k}: {v}\n" for k, v in meta.items())
    text = "---\nname: x\ndescription: d\n" + (f"metadata:\n{block}" if meta else "") + f"---\n{body}"
    new = versions.set_tested_with(text, "torch==2.13.0 trl==1.16.0")
    fm = frontmatter.parse(new)
    assert fm.problems == [] and fm.body == body
    assert fm.data["metadata"] == {**meta, versions.KEY: "torch==2.13.0 trl==1.16.0"}
    again = versions.set_tested_with(new, "torch==2.14.0")
    assert again.replace("torch==2.14.0", "torch==2.13.0 trl==1.16.0") == new  # one line changes, nothing else
