"""Measured tables with provenance: `skills measured --record` copies a run in, lint catches hand edits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillbook import catalog, lint
from skillbook.catalog import measured
from skillbook.cli import main
from skillbook.errors import SkillbookError

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def demo_root(tmp_path: Path) -> Path:
    """A throwaway root holding a copy of the example-demo skill with a measured block, and one run of it."""
    skill = tmp_path / "skills" / "example-demo"
    shutil.copytree(FIXTURES / "skills" / "example-demo", skill)
    md = skill / "SKILL.md"
    md.write_text(md.read_text() + f"\n## What you get (measured)\n\n{measured.START}\n{measured.END}\n")
    res = CliRunner().invoke(main, ["run", "example-demo", "--set", "steps=4"], env=_env(tmp_path))
    assert res.exit_code == 0, res.output
    return tmp_path


def _env(root: Path) -> dict[str, str]:
    return {"SKILLBOOK_ROOT": str(root), "SKILLBOOK_RUNS": str(root / "runs")}


def _measured(root: Path, *args: str):
    return CliRunner().invoke(main, ["measured", *args], env=_env(root))


def test_record_writes_the_table_and_its_provenance(demo_root: Path) -> None:
    res = _measured(demo_root, "--record", "example-demo", "--keys", "total,@seconds")
    assert res.exit_code == 0, res.output
    skill = demo_root / "skills" / "example-demo"
    record = json.loads((skill / measured.RECORD).read_text())
    assert record["values"]["total"] == 10
    prov = record["provenance"]
    assert prov["command"] == "skills run example-demo --set steps=4"  # only what differs from the defaults
    assert prov["run"] == (demo_root / "runs" / "example-demo" / "latest").resolve().name
    assert prov["cpu"] and prov["dtype"] == "float32"
    text = (skill / "SKILL.md").read_text()
    assert "| total | 10 |" in text and f"Recorded run `{prov['run']}`" in text
    assert not [f for f in lint.lint_skill(skill) if f.code in ("SB209", "SB210")]


def test_lint_flags_a_hand_edited_block_and_a_changed_recipe(demo_root: Path) -> None:
    assert _measured(demo_root, "--record", "example-demo", "--keys", "total").exit_code == 0
    skill = demo_root / "skills" / "example-demo"
    md = skill / "SKILL.md"
    md.write_text(md.read_text().replace("| total | 10 |", "| total | 11 |"))
    (skill / "recipe.py").write_text((skill / "recipe.py").read_text() + "\n# changed\n")
    codes = {(f.code, f.severity) for f in lint.lint_skill(skill)}
    assert ("SB209", "error") in codes and ("SB210", "warning") in codes
    assert _measured(demo_root).exit_code == 1  # the check exits 1 on a hand edit
    assert _measured(demo_root, "--write").exit_code == 0  # --write puts the recorded numbers back
    assert "| total | 10 |" in md.read_text()


def test_record_refuses_smoke_runs_missing_keys_and_a_skill_without_markers(demo_root: Path) -> None:
    skill = demo_root / "skills" / "example-demo"
    before = (skill / "SKILL.md").read_text()
    res = _measured(demo_root, "--record", "example-demo", "--keys", "nope")
    assert res.exit_code != 0 and "the summary has no nope" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["run", "example-demo"], env={**_env(demo_root), "SKILLBOOK_SMOKE_STEPS": "2"})
    assert res.exit_code == 0, res.output
    res = _measured(demo_root, "--record", "example-demo", "--keys", "total")
    assert res.exit_code != 0 and "smoke run" in res.output
    (skill / "SKILL.md").write_text(before.replace(measured.START, "").replace(measured.END, ""))
    run = sorted(p for p in (demo_root / "runs" / "example-demo").iterdir() if not p.is_symlink())[0]
    res = _measured(demo_root, "--record", "example-demo", "--keys", "total", "--run", str(run))
    assert res.exit_code != 0 and "no measured block" in res.output
    assert not (skill / measured.RECORD).exists()  # nothing half-written


def test_every_record_in_the_repo_matches_its_block() -> None:
    for skill in catalog.load_all():
        found = [f for f in lint.lint_skill(skill.path) if f.code == "SB209"]
        assert not found, found
    root = catalog.repo_root()
    assert measured.pipeline_records(root)  # the README's speedrun table
    for path in measured.pipeline_records(root):
        found = [p for p in measured.pipeline_problems(root, path) if p[0] == "SB209"]
        assert not found, found


def test_format_value_keeps_small_and_large_numbers_readable() -> None:
    assert [measured.format_value(v) for v in (0.44286, 1.4e-6, 2765.4, 123.45, 7, True, None)] == [
        "0.443",
        "1.4e-06",
        "2,765",
        "123.5",
        "7",
        "yes",
        "n/a",
    ]
    assert measured.format_value(0.4428, ".1%") == "44.3%"


def test_a_pipeline_record_renders_into_its_doc_and_refuses_reused_steps(demo_root: Path) -> None:
    """recipes/NAME.measured.json: cells read `step.key` from each step's summary; the block lives in `doc`."""
    recipes = demo_root / "recipes"
    recipes.mkdir()
    steps = "  - id: a\n    skill: example-demo\n  - id: b\n    skill: example-demo\n    config:\n      steps: 3\n"
    (recipes / "twice.yaml").write_text(f"name: twice\ndescription: Two sums.\nreport: false\nsteps:\n{steps}")
    layout = {"doc": "README.md", "columns": ["step", "total", "s"], "values": {}, "provenance": {}}
    layout["rows"] = [["a", "a.total", "a.@seconds|.0f"], ["b", "**b.total**", ""]]
    (recipes / "twice.measured.json").write_text(json.dumps(layout))
    readme = demo_root / "README.md"
    readme.write_text(f"# Demo\n\n{measured.marker({'pipeline': 'twice'})}\n{measured.END}\n")
    assert _pipeline_findings(demo_root) == ["SB209"]  # no run recorded yet
    res = CliRunner().invoke(main, ["run", "twice"], env=_env(demo_root))
    assert res.exit_code == 0, res.output
    res = _measured(demo_root, "--record", "twice")
    assert res.exit_code == 0, res.output
    record = json.loads((recipes / "twice.measured.json").read_text())
    assert record["values"]["a.total"] == 55 and record["values"]["b.total"] == 6
    assert record["provenance"]["command"] == "skills run twice" and record["provenance"]["recipe_sha256"]
    text = readme.read_text()
    assert "| a | 55 | 0 |" in text and "| b | **6** |  |" in text and "`skills run twice`" in text
    assert _pipeline_findings(demo_root) == []
    readme.write_text(text.replace("**6**", "**7**"))
    assert _pipeline_findings(demo_root) == ["SB209"]  # hand edit caught
    assert _measured(demo_root, "--write", "twice").exit_code == 0 and "**6**" in readme.read_text()
    assert CliRunner().invoke(main, ["run", "twice"], env=_env(demo_root)).exit_code == 0  # every step cached
    before = (recipes / "twice.measured.json").read_text()
    res = _measured(demo_root, "--record", "twice")
    assert res.exit_code != 0 and "reused from earlier runs" in res.output and "Traceback" not in res.output
    assert (recipes / "twice.measured.json").read_text() == before
    res = _measured(demo_root, "--rerun", "twice", "--workdir", str(demo_root / "rerun"))  # a fresh pipeline run
    assert res.exit_code == 0, res.output
    again = json.loads((recipes / "twice.measured.json").read_text())
    assert again["values"]["b.total"] == 6 and again["provenance"]["run"] != json.loads(before)["provenance"]["run"]
    assert not _pipeline_findings(demo_root)


def _pipeline_findings(root: Path) -> list[str]:
    return [f.code for f in lint.lint_repo(root) if "twice.measured.json" in str(f.path)]


def test_rerun_runs_each_recorded_command_inputs_first_and_records_it(demo_root: Path) -> None:
    assert _measured(demo_root, "--record", "example-demo", "--keys", "total").exit_code == 0
    path = demo_root / "skills" / "example-demo" / measured.RECORD
    old = json.loads(path.read_text())
    old["values"]["total"], old["provenance"]["run"] = 0, "an-older-run"
    path.write_text(json.dumps(old))
    work = demo_root / "rerun"
    res = _measured(demo_root, "--rerun", "--workdir", str(work))
    assert res.exit_code == 0, res.output
    record = json.loads(path.read_text())
    assert record["values"]["total"] == 10
    assert record["provenance"]["run"] == (work / "runs" / "example-demo" / "latest").resolve().name
    assert record["provenance"]["command"] == "skills run example-demo --set steps=4"
    assert (work / "runs" / "example-demo" / "latest" / "outputs.json").is_file()
    res = _measured(demo_root, "--rerun", "--workdir", str(work))  # not empty: refused
    assert res.exit_code != 0 and "not empty" in res.output and "Traceback" not in res.output
    chain = {"sft": "skills run sft --set model=runs/pretraining/latest/model", "pretraining": "skills run pretraining"}
    assert measured.rerun_order(chain) == ["pretraining", "sft"]
    assert measured.with_inputs(["sft"], chain) == ["pretraining", "sft"]
    with pytest.raises(SkillbookError, match="no record makes these inputs: sft reads runs/pretraining/latest"):
        measured.rerun_order({"sft": chain["sft"]})
