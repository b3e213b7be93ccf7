"""Hyperparameter search glue: a typed search space read from YAML, and one Optuna trial as one
`skills run <skill>` subprocess whose metrics.jsonl is read while it trains, so Optuna's pruner can stop
a bad trial early.

Why a subprocess per trial: each trial is then exactly a normal run (its own run dir, config.yaml, log),
trials run in parallel without sharing torch's thread pool or global state, and a pruned or timed-out
trial is stopped by a signal. Children die with the search (PR_SET_PDEATHSIG on Linux), so a killed
study leaves no orphan trial behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

POLL_SECONDS = 0.5


class ParamSpec(BaseModel):
    """One searched field: a float or int range (optionally log-scaled), or a list of choices."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"] = Field(..., description="float, int or categorical.")
    low: float | None = Field(None, description="Lower bound (float/int).")
    high: float | None = Field(None, description="Upper bound, inclusive (float/int).")
    log: bool = Field(False, description="Sample on a log scale (learning rates, weight decay).")
    step: float | None = Field(None, gt=0, description="Grid step of an int/float range; None = continuous.")
    choices: list[Any] | None = Field(None, description="The values of a categorical parameter.")

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs `choices: [...]`")
            return self
        if self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"a {self.type} parameter needs low < high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step:
            raise ValueError("log and step cannot be combined (Optuna samples one or the other)")
        return self


def suggest(trial: Any, name: str, spec: ParamSpec) -> Any:
    """The trial's value for `name` from Optuna's suggest_* API."""
    if spec.type == "categorical":
        return trial.suggest_categorical(name, spec.choices)
    assert spec.low is not None and spec.high is not None  # checked by ParamSpec
    if spec.type == "int":
        return trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
    return trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)


def get_dotted(data: dict, key: str) -> Any:
    """data["optim"]["lr"] for "optim.lr" (a config as plain dicts)."""
    for part in key.split("."):
        data = data[part]
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    """data["optim"]["lr"] = value for "optim.lr", creating the nested dicts."""
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TrialPrunedError(Exception):
    """The pruner stopped this trial at `step` (its last reported value is kept in the study)."""

    def __init__(self, step: int):
        super().__init__(f"pruned at step {step}")
        self.step = step


def run_trial(
    skill: str,
    config: dict,
    trial_dir: Path,
    report_key: str | None,
    report: Any,
    threads: int,
    timeout: float,
) -> dict:
    """Run `skills run <skill> --config <trial_dir>/config.yaml --json` into trial_dir/runs; every new
    `report_key` value in its metrics.jsonl goes to `report(step, value) -> prune?`. Returns the run's result
    (outputs.json + summary); raises TrialPrunedError when pruned, RuntimeError when the run fails or times out."""
    import yaml

    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    runs = trial_dir / "runs"
    argv = [sys.executable, "-m", "skillbook.cli", "run", skill, "--config", str(trial_dir / "config.yaml")]
    argv += ["--runs-dir", str(runs), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SKILLBOOK_TRACEBACK": "0"}
    with open(trial_dir / "stdout.json", "w") as out, open(trial_dir / "log.txt", "w") as log:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=log, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
        seen, start = 0, time.monotonic()
        try:
            while proc.poll() is None:
                time.sleep(POLL_SECONDS)
                if report_key:
                    seen = _report_new(runs, skill, report_key, seen, report)
                if time.monotonic() - start > timeout:
                    raise RuntimeError(f"trial timed out after {timeout:.0f} s (raise trial_timeout)")
            if report_key:
                _report_new(runs, skill, report_key, seen, report)
        except BaseException:
            _stop(proc)
            raise
    if proc.returncode != 0:
        tail = (trial_dir / "log.txt").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"`skills run {skill}` exited {proc.returncode}: {' | '.join(tail)}")
    try:
        return json.loads((trial_dir / "stdout.json").read_text())
    except ValueError as err:
        raise RuntimeError(f"`skills run {skill}` printed no JSON result: {err}") from None


def _report_new(runs: Path, skill: str, key: str, seen: int, report: Any) -> int:
    """Pass the metrics.jsonl lines after the first `seen` that carry `key` to report(); returns lines seen."""
    files = sorted(runs.glob(f"{skill}/*/metrics.jsonl"))
    if not files:
        return seen
    lines = files[-1].read_text().splitlines()
    complete = lines if lines and files[-1].read_text().endswith("\n") else lines[:-1]  # a line being written
    for line in complete[seen:]:
        row = json.loads(line)
        if key in row and "step" in row and report(int(row["step"]), float(row[key])):
            raise TrialPrunedError(int(row["step"]))
    return len(complete)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the trial's process group, SIGKILL after 5 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def write_plots(study: Any, out: Path, n_params: int) -> list[str]:
    """Optuna's own matplotlib plots as PNG: history, intermediate values, and importances (2+ params)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    makers = {"history.png": ovm.plot_optimization_history, "intermediate.png": ovm.plot_intermediate_values}
    if n_params > 1:
        makers["importances.png"] = ovm.plot_param_importances
    written = []
    for name, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = make(study)
            except (ValueError, RuntimeError):  # e.g. importances with a single complete trial
                continue
        figure = ax.get_figure(root=True)
        assert figure is not None
        figure.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(name)
    return written
