"""hyperparameter-search: an Optuna study over the tiny pretraining, one subprocess per trial.

- the search space is checked against the tuned skill's Config before any trial runs;
- a search killed with SIGKILL mid-study resumes on rerun: the trials finished before the kill keep their
  parameters and values (read back from study.db with Optuna's own loader), the study reaches n_trials,
  no trial process outlives the kill, and the best trial is at least as good as the default config (trial 0);
- the median pruner stops trials from the metrics they report.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import output, run_skill
from skillbook.errors import ConfigError

optuna = pytest.importorskip("optuna")

TINY = {"max_steps": 12, "eval_interval": 4, "eval_windows": 2, "n_layer": 2, "d_model": 64, "warmup_steps": 2}


def _base(prepared, tokenizer_dir) -> dict:
    return {**TINY, "corpus": str(output(prepared, "corpus")), "tokenizer": str(tokenizer_dir)}


def test_space_is_checked_before_any_trial(prepared, tokenizer_dir, tmp_path):
    base = _base(prepared, tokenizer_dir)
    with pytest.raises(ConfigError, match=r"space: 'lrr' is not a field of pretraining"):
        run_skill(
            "hyperparameter-search",
            tmp_path,
            {"base": base, "space": {"lrr": {"type": "float", "low": 0.1, "high": 1}}},
        )
    with pytest.raises(ConfigError, match=r"space: pretraining refuses lr=-1.0: .*lr: Input should be greater than 0"):
        run_skill(
            "hyperparameter-search", tmp_path, {"base": base, "space": {"lr": {"type": "float", "low": -1, "high": 1}}}
        )
    with pytest.raises(ConfigError, match=r"low < high"):
        run_skill("hyperparameter-search", tmp_path, {"space": {"lr": {"type": "float", "low": 1, "high": 0.1}}})
    assert not list(tmp_path.rglob("study.db"))


def _study(runs):
    (db,) = {p.resolve() for p in runs.glob("hyperparameter-search/*/study.db")}  # the run dir, or latest -> it
    return optuna.load_study(study_name="pretraining", storage=f"sqlite:///{db}")


def _count_finished(runs) -> int:
    """Finished trials of a search still running, read-only: Optuna's loader would create the schema too,
    racing the search's own create_all ("table trial_params already exists")."""
    dbs = {p.resolve() for p in runs.glob("hyperparameter-search/*/study.db")}
    if len(dbs) != 1:
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{dbs.pop()}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.Error:  # no tables yet, or the search holds a write lock this moment
        return 0


def _finished(study) -> dict[int, tuple]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return {t.number: (t.state.name, t.params, t.value) for t in study.get_trials() if t.state in states}


def test_search_resumes_after_sigkill_and_keeps_finished_trials(prepared, tokenizer_dir, tmp_path):
    runs = tmp_path / "runs"
    cfg = tmp_path / "search.yaml"
    cfg.write_text(json.dumps({"base": _base(prepared, tokenizer_dir), "n_trials": 5, "warmup_steps": 4}))
    argv = [sys.executable, "-m", "skillbook.cli", "run", "hyperparameter-search", "--config", str(cfg)]
    argv += ["--runs-dir", str(runs), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        time.sleep(1)
        if _count_finished(runs) >= 2:
            break
    assert first.poll() is None, first.stderr.read().decode()[-2000:]  # still searching: kill it mid-study
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = _finished(_study(runs))
    assert len(before) >= 2
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-f", str(runs / "hyperparameter-search")], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "trial processes outlived the killed search"

    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    result = json.loads(second.stdout)
    assert "resuming the study" in second.stderr
    after = _finished(_study(runs))
    assert {n: after[n] for n in before} == before  # nothing finished before the kill was lost or redone
    assert len(after) == 5
    s = result["summary"]
    assert s["n_complete"] + s["n_pruned"] == 5 and s["default_value"] is not None
    assert s["best_value"] <= s["default_value"]  # the default (trial 0) is the baseline the search must match
    trials = json.loads((output(result, "trials").parent / "trials.json").read_text())
    assert trials[0]["default"] and trials[0]["params"]["lr"] == 6e-3  # the pretraining default lr
    assert (output(result, "trials").parent / "history.png").read_bytes()[:4] == b"\x89PNG"
    best = output(result, "config").read_text()
    assert "max_steps: 12" in best and "lr:" in best


def test_median_pruner_stops_bad_trials(prepared, tokenizer_dir, tmp_path):
    """Trials with a learning rate far too small report a high val loss at every step and are pruned."""
    space = {"lr": {"type": "categorical", "choices": [6e-3, 1e-6]}}
    # One trial at a time: the default (6e-3) finishes first, so the median pruner always has its curve to
    # compare against (two at a time, a 1e-6 trial could finish before any other reported, and pass).
    sets = {"base": _base(prepared, tokenizer_dir), "space": space, "n_trials": 4, "n_jobs": 1}
    sets.update(startup_trials=1, warmup_steps=4, sampler="random", include_default=True)
    res = run_skill("hyperparameter-search", tmp_path, sets)
    trials = json.loads((output(res, "trials").parent / "trials.json").read_text())
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert pruned and all(t["params"]["lr"] == 1e-6 for t in pruned), trials
    assert all(t["last_step"] < TINY["max_steps"] for t in pruned)
