"""Smoke runs: a full-size command cut to seconds, so CI can run the `slow` blocks users copy first.

SKILLBOOK_SMOKE_STEPS=N makes every recipe run cap its step counts, intervals and eval sizes
(`smoke_cap`, recorded as smoke.json in the run and in its summary and env.json, so nobody mistakes
its numbers for a real run's); `smoke_code` cuts a block's `python benchmarks/...` lines the same way;
`link_runs` gives the block the `runs/<skill>/latest` placeholders it names. Imports only the config
layer, so the example runner can use it without loading the runner.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from skillbook.run import recipe as recipe_mod

SMOKE_ENV = "SKILLBOOK_SMOKE_STEPS"  # set for ```bash slow blocks (CONTRIBUTING)
SMOKE_RECORD = "smoke.json"
_EVAL_SIZES = ("eval_windows", "eval_docs", "eval_requests", "eval_limit", "limit", "max_questions", "kl_prompts")


def smoke_cap(cfg: recipe_mod.RecipeConfig) -> tuple[recipe_mod.RecipeConfig, dict]:
    """With SKILLBOOK_SMOKE_STEPS=N set, cap every `*steps`/`*_interval` field at N (warmup at N // 2) and the
    eval sizes at 2N, and turn a `smoke` switch on: example runs of full-size commands then take seconds.
    Returns the capped config and {field: [was, now]} (empty when the variable is unset or nothing changed)."""
    raw = os.environ.get(SMOKE_ENV, "").strip()
    if not raw:
        return cfg, {}
    n = max(1, int(raw))
    data, caps = cfg.model_dump(), {}
    for name, value in data.items():
        new: int | bool
        if isinstance(value, bool):
            new = True if name == "smoke" else value
        elif not isinstance(value, int):
            continue
        elif name.startswith("warmup") and name.endswith("steps"):
            new = min(value, n // 2)
        elif name.endswith("steps") or name.endswith("_interval"):
            new = min(value, n)
        elif name in _EVAL_SIZES:
            new = min(value, 2 * n)
        else:
            continue
        if new != value:
            caps[name] = [value, new]
            data[name] = new
    return (type(cfg).model_validate(data), caps) if caps else (cfg, {})


SMOKE_STEPS = 4  # SKILLBOOK_SMOKE_STEPS for `slow` blocks unless the environment sets another
SMOKE_TIMEOUT = 300.0  # a smoke run of a `slow` block: a few capped recipe runs
BENCH_FLAGS = ("--steps", "--rounds", "--tokens", "--clients", "--requests", "--prompts", "--warmup")
_BENCH_LINE = re.compile(r"^\s*python3? benchmarks/\S+\.py\b.*$", re.M)


def smoke_code(code: str, steps: int) -> str:
    """A `slow` block's text with its `python benchmarks/...` lines cut to a smoke run: numeric flags capped
    at `steps` (`--tokens`, `--clients`: 2 x steps; `--rounds`: 1) and a `--configs` list cut to its first
    entry (the smallest, by convention); line numbers stay as they are."""

    def cap_line(m: re.Match) -> str:
        def cap(f: re.Match) -> str:
            limit = {"--tokens": 2 * steps, "--clients": 2 * steps, "--rounds": 1}.get(f.group(1), steps)
            return f"{f.group(1)}{f.group(2)}{min(int(f.group(3)), limit)}"

        flags = "|".join(re.escape(f) for f in BENCH_FLAGS)
        line = re.sub(rf"({flags})([ =])(\d+)\b", cap, m.group(0))
        return re.sub(r"(--configs[ =])([\w.-]+),[\w.,-]+", r"\1\2", line)

    return _BENCH_LINE.sub(cap_line, code)


def link_runs(work: Path, runs: dict[str, str], root: Path) -> None:
    """The placeholders of a `slow` block: runs/<skill>/latest and runs/<skill>/<run> -> each fixture run,
    and benchmarks/ -> the repository's (the block's own runs land next to them, in the same runs/)."""
    for skill, run_dir in runs.items():
        target = Path(run_dir).resolve()
        (work / "runs" / skill).mkdir(parents=True, exist_ok=True)
        for name in ("latest", target.name):
            (work / "runs" / skill / name).symlink_to(target, target_is_directory=True)
    if (root / "benchmarks").is_dir():
        (work / "benchmarks").symlink_to(root / "benchmarks", target_is_directory=True)
