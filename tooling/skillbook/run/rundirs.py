"""Run directories: where a run goes (`runs/<skill>/<time>-<confighash>/`), the lock that keeps two runs out
of one directory, and the failed runs `skills runs gc` removes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from skillbook.errors import SkillbookError
from skillbook.run import recipe as recipe_mod


def _now() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def config_hash(cfg: recipe_mod.RecipeConfig) -> str:
    """Short hash of the resolved config, ignoring `resume` (a resumed run is the same run)."""
    data = cfg.model_dump(mode="json")
    data.pop("resume", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def runs_root(runs_dir: Path | None = None) -> Path:
    return Path(runs_dir or os.environ.get("SKILLBOOK_RUNS") or Path.cwd() / "runs")


LOCK = ".lock"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock on run_dir/.lock while a run writes there: a second run that picks the same
    directory (two `resume: auto` runs, a pipeline step run twice at once) fails at once instead of
    writing over the first. The kernel drops the lock when the process dies, so a killed run never
    leaves a stale one."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SkillbookError(
            f"{run_dir} is in use by another run; wait for it to finish, or start a fresh run "
            "(without resume: auto, or with another --runs-dir)"
        ) from None
    try:
        yield
    finally:
        handle.close()  # closing the file releases the lock


def in_use(run_dir: Path) -> bool:
    """Whether a live run holds run_dir's lock."""
    import fcntl

    if not (run_dir / LOCK).exists():
        return False
    with (run_dir / LOCK).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def failed_runs(runs_dir: Path | None = None) -> list[Path]:
    """Run directories of failed skill runs (error.txt, no outputs.json, no live run): `skills runs gc` removes them."""
    base = runs_root(runs_dir)
    found = []
    for error in sorted(base.glob("*/*/error.txt")) if base.is_dir() else []:
        run_dir = error.parent
        if run_dir.parent.name in ("pipelines",) or (run_dir / "outputs.json").exists() or in_use(run_dir):
            continue
        found.append(run_dir)
    return found


def new_run_dir(skill: str, cfg: recipe_mod.RecipeConfig, runs_dir: Path | None = None) -> Path:
    """A fresh run directory, or with `resume: auto` the latest unfinished one with the same config that no
    live run holds."""
    base = runs_root(runs_dir) / skill
    chash = config_hash(cfg)
    if getattr(cfg, "resume", None) == "auto" and base.is_dir():
        earlier = sorted(p for p in base.glob(f"*-{chash}") if not (p / "outputs.json").exists() and not in_use(p))
        if earlier:
            return earlier[-1]
    run_dir = base / f"{_now()}-{chash}"
    n = 1
    while run_dir.exists():
        run_dir = base / f"{_now()}-{chash}.{n}"
        n += 1
    return run_dir


LATEST = "latest"


def link_latest(run_dir: Path, skill: str) -> None:
    """Point runs/<skill>/latest at a finished run (relative, replaced atomically), so docs and pipelines can say
    `runs/sft/latest/model`. Only for `runs/<skill>/<run>`: sub-runs and pipeline steps get none."""
    if run_dir.parent.name != skill or run_dir.parent.parent.name == "cache":  # pipeline steps: runs/cache/<skill>
        return
    link, tmp = run_dir.parent / LATEST, run_dir.parent / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)
