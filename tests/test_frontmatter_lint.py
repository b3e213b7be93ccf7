"""Lint and frontmatter: spec rules on crafted bad skills, and no crash on malformed input."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skillbook import catalog, lint
from skillbook.catalog import frontmatter, scaffold


def make_repo(tmp_path: Path) -> Path:
    (tmp_path / "skills").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    return tmp_path


def write_skill(root: Path, folder: str, md: str) -> Path:
    path = root / "skills" / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "SKILL.md").write_text(md)
    return path


GOOD = """---
name: {name}
description: Does a thing. Use when you need the thing.
metadata:
  stage: data
---

# Title

```bash
echo hi
```
"""


def codes(findings) -> set[str]:
    return {f.code for f in findings}


def test_good_skill_is_clean(tmp_path):
    root = make_repo(tmp_path)
    path = write_skill(root, "good-one", GOOD.format(name="good-one"))
    assert lint.lint_skill(path) == []


def test_name_must_equal_folder_and_spec_format(tmp_path):
    root = make_repo(tmp_path)
    findings = lint.lint_skill(write_skill(root, "folder-name", GOOD.format(name="other-name")))
    assert "SB106" in codes(findings)
    for bad in ("Bad-Name", "-lead", "trail-", "dou--ble", "x" * 65):
        problems = frontmatter.check({"name": bad, "description": "d"})
        assert any(p.code == "SB105" for p in problems), bad


def test_unknown_keys_flow_lists_and_metadata_types(tmp_path):
    root = make_repo(tmp_path)
    md = "---\nname: bad\ndescription: d\ntags: [a, b]\nversion: 1\nmetadata:\n  n: 3\n---\nbody\n"
    findings = lint.lint_skill(write_skill(root, "bad", md))
    by_code = {f.code: f for f in findings}
    assert {"SB103", "SB104", "SB109"} <= set(by_code)
    assert by_code["SB103"].line == 4  # the flow list is on line 4 of SKILL.md
    assert "tags" in " ".join(f.message for f in findings if f.code == "SB104")


def test_description_limits_and_missing(tmp_path):
    assert any(p.code == "SB107" for p in frontmatter.check({"name": "a"}))
    assert any(p.code == "SB107" for p in frontmatter.check({"name": "a", "description": "x" * 1025}))
    assert any(
        p.code == "SB108" for p in frontmatter.check({"name": "a", "description": "d", "compatibility": "c" * 501})
    )


def test_links_resolve_case_sensitively(tmp_path):
    root = make_repo(tmp_path)
    path = write_skill(root, "linky", GOOD.format(name="linky") + "\nSee [ref](references/REFERENCE.md).\n")
    (path / "references").mkdir()
    (path / "references" / "reference.md").write_text("# ref\n")
    findings = [f for f in lint.lint_skill(path) if f.code == "SB202"]
    assert len(findings) == 1 and "REFERENCE.md" in findings[0].message
    assert findings[0].line == 14  # the line of the link in SKILL.md


def test_code_blocks_need_language_parse_and_one_executed(tmp_path):
    root = make_repo(tmp_path)
    md = "---\nname: blocks\ndescription: d\n---\n\n```\nno lang\n```\n\n```python fragment\ndef broken(:\n```\n"
    findings = lint.lint_skill(write_skill(root, "blocks", md))
    assert {"SB204", "SB205", "SB206"} <= codes(findings)


def test_body_length_limit(tmp_path):
    root = make_repo(tmp_path)
    md = GOOD.format(name="long") + "line\n" * 600
    assert "SB201" in codes(lint.lint_skill(write_skill(root, "long", md)))


def test_recipe_rules(tmp_path):
    root = make_repo(tmp_path)
    path = scaffold.new_skill("rec-ok", root=root)
    assert lint.lint_skill(path) == []
    # A heavy module-level import and a default config with an unknown key are both findings.
    src = (path / "recipe.py").read_text().replace("import json\n", "import json\nimport torch\n")
    (path / "recipe.py").write_text(src)
    (path / "recipe.yaml").write_text("# yaml-language-server: $schema=../../schemas/rec-ok.schema.json\nstepz: 3\n")
    found = codes(lint.lint_skill(path))
    assert {"SB304", "SB303"} <= found


JUNK = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=400).map(lambda t: ("---\n" + t + "\n---\nbody\n").encode("utf-8", "surrogatepass")),
    st.text(alphabet="-:[]{}'\"\n #&*!|>%@`abc", max_size=300).map(lambda t: ("---\n" + t).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=JUNK)
def test_lint_never_crashes_on_junk(tmp_path, data):
    root = make_repo(tmp_path) if not (tmp_path / "skills").exists() else tmp_path
    path = root / "skills" / "junk"
    path.mkdir(parents=True, exist_ok=True)
    (path / "SKILL.md").write_bytes(data)
    findings = lint.lint_skill(path)
    assert all(f.code != "SB999" for f in findings), findings  # a rule crash would show as SB999
    assert findings, "malformed input must produce at least one finding"


def test_huge_frontmatter_and_missing_files_are_findings(tmp_path):
    root = make_repo(tmp_path)
    huge = "---\nname: big\ndescription: " + "x" * (10 * 1024 * 1024) + "\n---\nbody\n"
    assert "SB101" in codes(lint.lint_skill(write_skill(root, "big", huge)))
    empty = root / "skills" / "empty"
    empty.mkdir()
    assert "SB100" in codes(lint.lint_skill(empty))


def test_recipe_yaml_and_presets_hold_only_overrides(tmp_path):
    """SB305: a key equal to its field default is a second source of that default."""
    import shutil

    from conftest import ROOT
    from skillbook.lint import recipes

    skill = tmp_path / "example-demo"
    shutil.copytree(ROOT / "tests" / "fixtures" / "skills" / "example-demo", skill)
    head = "# yaml-language-server: $schema=../../schemas/example-demo.schema.json\n"
    (skill / "recipe.yaml").write_text(head + "steps: 10\n")
    (skill / "configs").mkdir(exist_ok=True)
    (skill / "configs" / "longer.yaml").write_text("steps: 50\n")
    [finding] = recipes.rule_overrides_only(catalog.load_skill(skill))
    assert finding.code == "SB305" and finding.line == 2 and "'steps: 10' repeats the field default" in finding.message
    (skill / "recipe.yaml").write_text(head + "steps: 3  # a shorter default run\n")
    (skill / "configs" / "back.yaml").write_text("steps: 10\n")  # restores the default recipe.yaml changed: fine
    assert list(recipes.rule_overrides_only(catalog.load_skill(skill))) == []
