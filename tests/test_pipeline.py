"""Pipelines: whole-DAG validation, the step cache, --force, resume after a kill, runs gc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillbook.cli import main
from skillbook.errors import ConfigError
from skillbook.run import pipeline

MAKER = """
import json, os, time
from pathlib import Path
from pydantic import Field
from skillbook.run.recipe import RecipeConfig
OUTPUTS = {"corpus": "corpus"}
class Config(RecipeConfig):
    n: int = Field(3, ge=1, description="How many lines.")
def run(cfg, ctx):
    out = ctx.out_dir / "corpus"; out.mkdir()
    (out / "train.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\\n" for i in range(cfg.n)))
    for i in range(cfg.n):
        ctx.log(step=i, loss=1.0 / (i + 1))
    ctx.summary["lines"] = cfg.n
    return {"corpus": out}
"""

COUNTER = """
import os, time
from pathlib import Path
from pydantic import Field
from skillbook.run.recipe import RecipeConfig
OUTPUTS = {"report": "eval-report"}
INPUTS = {"corpus": "corpus"}
class Config(RecipeConfig):
    corpus: str = Field(..., description="Corpus dir.")
    scale: int = Field(1, description="Multiplier.")
def run(cfg, ctx):
    if os.environ.get("SLOW_STEP") == ctx.skill:
        time.sleep(60)  # the test kills the pipeline here
    lines = (Path(cfg.corpus) / "train.jsonl").read_text().count("\\n")
    out = ctx.out_dir / "eval.json"
    out.write_text(f'{{"exact_match": {lines * cfg.scale / 100}}}')
    ctx.summary["exact_match"] = lines * cfg.scale / 100
    return {"report": out}
"""

PIPE = """name: chain
description: Makes a corpus, then counts it twice.
steps:
  - id: make
    skill: maker
    config:
      n: 3
  - id: count
    skill: counter
    label: first
    config:
      corpus: ${steps.make.corpus}
  - id: count2
    skill: counter
    label: second
    config:
      corpus: ${steps.make.corpus}
      scale: 2
"""


def add_skill(root: Path, name: str, source: str) -> None:
    path = root / "skills" / name
    path.mkdir(parents=True)
    (path / "SKILL.md").write_text(
        f"---\nname: {name}\ndescription: Test skill. Use in tests.\n---\n\n```bash\necho ok\n```\n"
    )
    (path / "recipe.py").write_text(source)
    (path / "recipe.yaml").write_text(f"# yaml-language-server: $schema=../../schemas/{name}.schema.json\n")


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "repo"
    (root / "skills").mkdir(parents=True)
    (root / "recipes").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname='x'\n")
    add_skill(root, "maker", MAKER)
    add_skill(root, "counter", COUNTER)
    (root / "recipes" / "chain.yaml").write_text(PIPE)
    monkeypatch.setenv("SKILLBOOK_ROOT", str(root))
    return root


def run(repo: Path, runs: Path, *extra: str) -> dict:
    return pipeline.run_file(repo / "recipes" / "chain.yaml", runs_dir=runs, quiet=True, **_kw(extra))


def _kw(extra):
    force = [e.split("=", 1)[1] for e in extra if e.startswith("force=")]
    sets = [e.split("=", 1)[1] for e in extra if e.startswith("set=")]
    return {"force": force, "sets": sets}


def statuses(record: dict) -> dict[str, str]:
    return {s["id"]: s["status"] for s in record["steps"]}


def test_rerun_is_cached_and_config_change_reruns_only_dependents(repo, tmp_path):
    runs = tmp_path / "runs"
    first = run(repo, runs)
    assert statuses(first) == {"make": "ran", "count": "ran", "count2": "ran"}
    assert statuses(run(repo, runs)) == {"make": "cached", "count": "cached", "count2": "cached"}
    # A change to count2 reruns count2 only; a change to make reruns everything downstream of it.
    assert statuses(run(repo, runs, "set=count2.scale=5")) == {"make": "cached", "count": "cached", "count2": "ran"}
    changed = run(repo, runs, "set=make.n=4")
    assert statuses(changed) == {"make": "ran", "count": "ran", "count2": "ran"}
    assert changed["steps"][1]["summary"]["exact_match"] == pytest.approx(0.04)


def test_force_reruns_a_step_and_its_dependents(repo, tmp_path):
    runs = tmp_path / "runs"
    run(repo, runs)
    assert statuses(run(repo, runs, "force=make")) == {"make": "ran", "count": "ran", "count2": "ran"}
    assert statuses(run(repo, runs, "force=count")) == {"make": "cached", "count": "ran", "count2": "cached"}
    with pytest.raises(ConfigError, match="no such step"):
        run(repo, runs, "force=nope")


def test_report_puts_stages_side_by_side(repo, tmp_path):
    record = run(repo, tmp_path / "runs")
    report = Path(record["report"]).read_text()
    assert "| metric | first | second |" in report and "| exact_match | 0.03 | 0.06 |" in report
    assert (Path(record["run_dir"]) / "loss_curves.png").stat().st_size > 1000


def test_validation_lists_every_problem_and_runs_nothing(repo, tmp_path):
    bad = (
        PIPE.replace("${steps.make.corpus}\n      scale: 2", "${steps.make.nope}\n      scale: two")
        .replace("skill: maker", "skill: makr")
        .replace(
            "label: first\n    config:\n      corpus: ${steps.make.corpus}",
            "config:\n      corpus: ${steps.count2.report}",
        )
    )
    (repo / "recipes" / "bad.yaml").write_text(bad.replace("name: chain", "name: bad"))
    runs = tmp_path / "runs"
    res = CliRunner().invoke(main, ["run", "bad", "--runs-dir", str(runs)])
    assert res.exit_code != 0
    text = res.output
    assert "unknown skill 'makr'; did you mean 'maker'?" in text
    assert "refers to a later step" in text
    assert "scale" in text and "valid integer" in text
    assert "4 problem(s)" in text or "3 problem(s)" in text
    assert not runs.exists()


def test_kind_mismatch_is_reported(repo):
    spec = pipeline.PipelineSpec.model_validate(
        {
            "name": "k",
            "description": "d",
            "steps": [
                {"id": "a", "skill": "maker"},
                {"id": "b", "skill": "counter", "config": {"corpus": "${steps.a.corpus}"}},
                {"id": "c", "skill": "counter", "config": {"corpus": "${steps.b.report}"}},
            ],
        }
    )
    problems = pipeline.validate(spec, repo)
    assert len(problems) == 1 and "wants a corpus but ${steps.b.report} is a eval-report" in problems[0]


def test_killed_pipeline_resumes_at_the_unfinished_step(repo, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "SLOW_STEP": "counter", "SKILLBOOK_ROOT": str(repo)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "skillbook.cli", "run", "chain", "--runs-dir", str(runs)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not list((runs / "cache" / "counter").glob("*/config.yaml")) and time.time() < deadline:
            time.sleep(0.2)
        assert list((runs / "cache" / "counter").glob("*/config.yaml")), "the slow step never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    record = run(repo, runs)
    assert statuses(record) == {"make": "cached", "count": "ran", "count2": "ran"}


def test_runs_lists_and_gc_prunes_unreferenced_entries(repo, tmp_path):
    runs = tmp_path / "runs"
    run(repo, runs)
    run(repo, runs, "set=count2.scale=7")  # the old count2 entry is now unreferenced
    listed = json.loads(CliRunner().invoke(main, ["runs", "--runs-dir", str(runs), "--json"]).stdout)
    assert sum(1 for r in listed if r["kind"] == "pipeline") == 2
    removed = pipeline.gc(runs)
    assert len(removed) == 1 and removed[0].parent.name == "counter"
    assert statuses(run(repo, runs, "set=count2.scale=7")) == {"make": "cached", "count": "cached", "count2": "cached"}


def test_cache_key_covers_the_shared_helpers_a_recipe_imports():
    """A step's cache key must change when a skillbook.ml helper it runs changes, or a fixed data
    generator would keep serving the stale cached step."""
    from skillbook.catalog import find
    from skillbook.run import recipe as recipe_mod

    sft = recipe_mod.load(find("sft").path)
    text = sft.code_text()
    ml = Path(recipe_mod.__file__).parents[1] / "ml"
    for module in ("posttrain", "evaluate", "synthetic"):  # synthetic only through a helper sft imports: transitive
        assert (ml / f"{module}.py").read_text() in text, module
    assert (ml / "serve_procs.py").read_text() not in text  # unrelated helpers do not invalidate it
    assert recipe_mod.ml_imports("from skillbook.ml import lm_data, training as tr\n", in_ml=False) == {
        "lm_data",
        "training",
    }
    assert recipe_mod.ml_imports("from ..errors import X\nfrom .evaluate import y\n", in_ml=True) == {"evaluate"}
    assert recipe_mod.ml_imports(
        "def f():\n    from skillbook.ml import (evaluate,  # metrics\n"
        "        posttrain as pt)\n    from skillbook.ml.moe import x\n",
        in_ml=False,
    ) == {"evaluate", "posttrain", "moe"}
    # the same in every process: set order follows PYTHONHASHSEED, the key must not
    probe = (
        "import hashlib, sys; from skillbook.run import recipe; from skillbook.catalog import find; "
        "print(hashlib.sha256(recipe.load(find('sft').path).code_text().encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1, digests


def test_a_step_that_refers_to_itself_is_refused_at_validation(repo):
    spec = pipeline.PipelineSpec.model_validate(
        {
            "name": "k",
            "description": "d",
            "steps": [
                {"id": "a", "skill": "maker"},
                {"id": "b", "skill": "counter", "config": {"corpus": "${steps.b.report}"}},
            ],
        }
    )
    problems = pipeline.validate(spec, repo)
    assert any("${steps.b.report} refers to the step itself" in p for p in problems), problems


def test_the_same_pipeline_in_a_moved_runs_dir_reuses_every_step(repo, tmp_path):
    """Cache keys hash a reference by its name and its content, not by its path under the runs dir."""
    import shutil

    run(repo, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert statuses(run(repo, tmp_path / "b")) == {"make": "cached", "count": "cached", "count2": "cached"}


def test_a_run_dir_in_use_is_refused_and_resume_auto_skips_it(repo, tmp_path):
    from skillbook.errors import SkillbookError
    from skillbook.run import recipe, rundirs, runner

    rec = recipe.load(repo / "skills" / "maker")
    cfg = recipe.resolve(rec)
    busy = tmp_path / "runs" / "maker" / "busy"
    with rundirs.run_lock(busy):
        assert rundirs.in_use(busy)
        with pytest.raises(SkillbookError, match=r"busy is in use by another run"):
            runner.run(rec, cfg, run_dir=busy, quiet=True)
        assert not (busy / "outputs.json").exists() and not (busy / "config.yaml").exists()
    assert not rundirs.in_use(busy)  # released on exit
    assert runner.run(rec, cfg, run_dir=busy, quiet=True)["outputs"]["corpus"]


def test_resume_auto_never_joins_a_live_run(tmp_path, monkeypatch):
    from skillbook.run import rundirs

    class Cfg:
        resume = "auto"

    monkeypatch.setattr(rundirs, "config_hash", lambda cfg: "abc")
    live = tmp_path / "pretraining" / "20260101-000000-abc"
    with rundirs.run_lock(live):
        assert rundirs.new_run_dir("pretraining", Cfg(), tmp_path) != live  # type: ignore[arg-type]
    assert rundirs.new_run_dir("pretraining", Cfg(), tmp_path) == live  # unfinished and free: resumed


def test_gc_removes_failed_runs_but_not_live_or_finished_ones(tmp_path):
    from skillbook.run import rundirs

    runs = tmp_path / "runs"
    failed, live, done = (runs / "sft" / name for name in ("failed", "live", "done"))
    for d in (failed, live, done):
        d.mkdir(parents=True)
        (d / "error.txt").write_text("Traceback ...")
    (done / "outputs.json").write_text("{}")  # a finished run whose earlier attempt failed
    with rundirs.run_lock(live):
        assert pipeline.gc(runs, dry_run=True) == [failed] and failed.exists()
        out = CliRunner().invoke(main, ["runs", "--runs-dir", str(runs), "gc"])
        assert out.exit_code == 0 and f"removed {failed}" in out.output and "1 directory removed" in out.output
    assert not failed.exists() and live.exists() and done.exists()
