"""Skills run as subprocesses of another run: the inputs they share made once, and one `skills run <skill>`
child whose metrics.jsonl is read while it trains (hyperparameter-search reports it to Optuna's pruner).

Why a subprocess: each child is then exactly a normal run (its own run dir, config.yaml, log), children run
in parallel without sharing torch's thread pool or global state, and a pruned or timed-out one is stopped
by a signal. Children die with their parent (PR_SET_PDEATHSIG on Linux), so a killed search or comparison
leaves no orphan behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

POLL_SECONDS = 0.5


def shared_inputs(inputs: dict[str, str], base: dict, ctx: Any, seed: int = 0) -> dict:
    """`base` plus the corpus and tokenizer a skill takes (its INPUTS), made once in this run when not given,
    so N children do not each prepare their own."""
    base = json.loads(json.dumps(base))
    if "corpus" in inputs and "corpus" not in base:
        data = ctx.run_skill("data-preparation", {"seed": seed})
        base["corpus"] = data["outputs"]["corpus"]["path"]
    if "tokenizer" in inputs and "tokenizer" not in base:
        tokenizer = ctx.run_skill("tokenization", {"corpus": base.get("corpus")})
        base["tokenizer"] = tokenizer["outputs"]["tokenizer"]["path"]
    return base


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TrialPrunedError(Exception):
    """The pruner stopped this trial at `step` (its last reported value is kept in the study)."""

    def __init__(self, step: int):
        super().__init__(f"pruned at step {step}")
        self.step = step


def run_child(
    skill: str,
    config: dict,
    trial_dir: Path,
    report_key: str | None = None,
    report: Any = None,
    threads: int = 1,
    timeout: float = 3600,
    launcher: tuple[str, ...] = (),
) -> dict:
    """Run `skills run <skill> --config <trial_dir>/config.yaml --json` into trial_dir/runs; every new
    `report_key` value in its metrics.jsonl goes to `report(step, value) -> prune?`. Returns the run's result
    (outputs.json + summary); raises TrialPrunedError when pruned, RuntimeError when the run fails or times out.
    `launcher`: extra `skills run` options, e.g. ("--launcher", "torchrun", "--nproc-per-node", "2")."""
    import yaml

    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    runs = trial_dir / "runs"
    argv = [sys.executable, "-m", "skillbook.cli", "run", skill, "--config", str(trial_dir / "config.yaml")]
    argv += ["--runs-dir", str(runs), "--json", *launcher]
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
