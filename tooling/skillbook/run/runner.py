"""Run a recipe: the RunContext it gets, the run directory, metrics, logs, outputs and launchers.

A run directory `runs/<skill>/<time>-<confighash>/` holds config.yaml, metrics.jsonl,
log.txt, outputs.json, env.json (skillbook.run.environment) and report.md. Nothing is created
before the config validates. `--launcher torchrun` (or `accelerate`, skillbook.run.launchers) hands the
same run directory to `torch.distributed.run`, whose workers re-enter through `skillbook.run.worker`;
every rank returns the same outputs, rank 0 alone writes. A skill run by another (`ctx.run_skill`) runs
in-process into a sub-directory of the caller's run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skillbook.errors import SkillbookError
from skillbook.run import environment, threads
from skillbook.run import recipe as recipe_mod
from skillbook.run.launchers import Launcher
from skillbook.run.rundirs import link_latest, new_run_dir, run_lock
from skillbook.run.smoke import SMOKE_ENV, SMOKE_RECORD, smoke_cap


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a directory's (relative path, content) pairs in sorted order."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent if path.is_file() else path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class Progress:
    """A progress bar on stderr (rich), quiet on non-main ranks."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: Any = None  # a rich Progress while a bar is shown
        self._task: Any = None

    def start(self, total: int, description: str) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.stop()
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task(description, total=total, metrics="")
        self._bar.start()

    def update(self, step: int | None, metrics: dict) -> None:
        if self._bar is None:
            return
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:4])
        kwargs = {"completed": step} if step is not None else {}
        self._bar.update(self._task, metrics=shown, **kwargs)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@dataclass
class RunContext:
    """What a recipe gets besides its config: where to write, how to log, who it is, what it runs on.

    `rank`, `world_size` and `local_rank` come from torchrun's environment (0, 1, 0 in a plain process);
    `setup_device()` joins the process group and sets `device`, `choose_dtype()` sets `dtype`, and
    `run_skill()` runs another skill inside this run. This is the one record of them: the training
    helpers (skillbook.ml.training) ask torch's process group, which `setup_device` joined.
    """

    skill: str
    run_dir: Path
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None  # set by setup_device
    dtype: str | None = None  # set by choose_dtype
    skills_dir: Path | None = None  # where the skills that run_skill names live (this skill's siblings)
    summary: dict = field(default_factory=dict)
    quiet: bool = False

    def __post_init__(self) -> None:
        self._progress = Progress(enabled=self.is_main and not self.quiet)
        self._t0 = time.time()
        self._joined = False  # this context joined the process group, so it leaves it on close()
        self.trackers: Any = None  # skillbook.run.tracking.Trackers when the config's `tracking` asks for them

    @property
    def out_dir(self) -> Path:
        """Artifacts live inside the run directory; a recipe writes nothing outside it."""
        return self.run_dir

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def setup_device(self, requested: str = "auto") -> str:
        """This rank's device, also kept as `ctx.device`: 'auto' = cuda:<local_rank> with a GPU, else cpu.

        Under torchrun (world_size > 1) it first joins the process group (nccl on GPUs, gloo on CPU);
        call it once, before any collective or `run_skill`. The group is left when the run ends.
        """
        from skillbook.ml.training import distributed

        self.device, joined = distributed.setup(requested, self.world_size, self.local_rank)
        self._joined = self._joined or joined
        return self.device

    def choose_dtype(self, requested: str, n_params: int | None = None):
        """The autocast dtype for `ctx.device` and why (skillbook.ml.training.precision.choose_dtype).

        Kept as `ctx.dtype`; dtype and dtype_reason go into the summary (tests and reports read them).
        """
        from skillbook.ml.training import precision

        if self.device is None:
            raise SkillbookError("ctx.choose_dtype needs the device: call ctx.setup_device() first")
        choice = precision.choose_dtype(requested, self.device, n_params)
        self.dtype = choice.dtype
        self.summary.update(dtype=choice.dtype, dtype_reason=choice.reason)
        return choice

    def run_skill(self, name: str, overrides: dict | None = None) -> dict:
        """Run skill `name` inside this run; its result (what its outputs.json holds) on every rank.

        Its config resolves through the usual layers (field defaults < its recipe.yaml < `overrides`), and
        it runs in this process into `run_dir/<name>/`: nothing is written outside this run. Rank 0 runs
        it; under torchrun the other ranks wait for it (call setup_device first). A finished sub-run with
        the same config is reused, so a resumed run does not redo it. Pass `name` as a string literal:
        the pipeline's cache key includes the code of every skill called so (Recipe.code_text).
        """
        if self.skills_dir is None:
            raise SkillbookError(f"ctx.run_skill({name!r}): this context was made without skills_dir")
        rec = recipe_mod.load(self.skills_dir / name)
        cfg, caps = smoke_cap(recipe_mod.resolve(rec, overrides=overrides))
        sub = self.run_dir / name
        done = (sub / "outputs.json").is_file() and (sub / "config.yaml").read_text() == recipe_mod.dump(cfg)
        if self.is_main and not done:
            recipe_mod.check_inputs(rec, cfg)
            shutil.rmtree(sub, ignore_errors=True)  # an unfinished or differently configured earlier try
            child = RunContext(name, prepare(rec, cfg, run_dir=sub, smoke=caps), skills_dir=self.skills_dir, quiet=True)
            run_in(rec, cfg, child)
            self.info(f"ran skill '{name}' into {sub}")
        if self.distributed:
            from skillbook.ml.training import distributed

            if distributed.world_size() == 1:
                raise SkillbookError(
                    "ctx.run_skill under torchrun needs the process group: call ctx.setup_device() first"
                )
            distributed.barrier()  # the other ranks wait until rank 0 has written the sub-run
        return json.loads((sub / "outputs.json").read_text())

    def info(self, message: str) -> None:
        """A log line: log.txt and stderr (main rank only)."""
        if not self.is_main:
            return
        line = f"[{time.time() - self._t0:7.1f}s] {message}"
        with open(self.run_dir / "log.txt", "a") as fh:
            fh.write(line + "\n")
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def progress(self, total: int, description: str | None = None) -> None:
        """Start a progress bar of `total` steps; `log(step=...)` advances it."""
        self._progress.start(total, description or self.skill)

    def log(self, step: int | None = None, **metrics: Any) -> None:
        """One metrics.jsonl record (main rank only) and a progress-bar update."""
        if not self.is_main:
            return
        record: dict[str, Any] = {"step": step} if step is not None else {}
        record.update(time=round(time.time() - self._t0, 3), **metrics)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        if self.trackers is not None:
            self.trackers.log(step, metrics)
        self._progress.update(step, metrics)

    def report(self, markdown: str) -> None:
        """Write report.md (main rank only)."""
        if self.is_main:
            (self.run_dir / "report.md").write_text(markdown)

    def close(self, failed: bool = False) -> None:
        """Stop the progress bar, close the trackers and leave the process group this context joined."""
        self._progress.stop()
        if self.trackers is not None:
            self.trackers.close(failed)
            self.trackers = None
        if self._joined:
            from skillbook.ml.training import distributed

            distributed.teardown()
            self._joined = False


def context_from_env(skill: str, run_dir: Path, quiet: bool = False, skills_dir: Path | None = None) -> RunContext:
    """The context of one process: torchrun's RANK, WORLD_SIZE, LOCAL_RANK (a plain process is rank 0 of 1)."""
    return RunContext(
        skill=skill,
        run_dir=run_dir,
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        skills_dir=skills_dir,
        quiet=quiet,
    )


def check_outputs(recipe: recipe_mod.Recipe, outputs: Any) -> dict:
    """run()'s return value, checked on every rank: a dict holding every declared output."""
    if not isinstance(outputs, dict):
        raise SkillbookError(f"recipe '{recipe.name}': run() must return a dict of output name -> path")
    missing = sorted(set(recipe.OUTPUTS) - set(outputs))
    if missing:
        raise SkillbookError(f"recipe '{recipe.name}': run() did not return declared outputs {missing}")
    return outputs


def finalize(recipe: recipe_mod.Recipe, ctx: RunContext, outputs: dict, started: float) -> dict:
    """Check the returned artifacts exist, write outputs.json and env.json, return the result (rank 0)."""
    arts = {}
    for name, path in outputs.items():
        path = Path(path)
        if not path.exists():
            raise SkillbookError(f"recipe '{recipe.name}': output '{name}' points at {path}, which does not exist")
        arts[name] = {"path": str(path.resolve()), "kind": recipe.OUTPUTS.get(name, "file"), "sha256": hash_path(path)}
    result: dict[str, Any] = {
        "skill": recipe.name,
        "run_dir": str(ctx.run_dir.resolve()),
        "status": "ok",
        "seconds": round(time.time() - started, 2),
        "outputs": arts,
        "summary": ctx.summary,
    }
    env = environment.env_info(recipe.skill_dir.parent.parent, ctx.device, ctx.dtype)
    if (ctx.run_dir / SMOKE_RECORD).is_file():  # a capped example run: say so wherever its numbers are read
        env["smoke"] = result["summary"]["smoke"] = json.loads((ctx.run_dir / SMOKE_RECORD).read_text())
    (ctx.run_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    if not (ctx.run_dir / "report.md").exists():
        ctx.report(default_report(recipe, ctx, result))
    (ctx.run_dir / "outputs.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    link_latest(ctx.run_dir, recipe.name)
    return result


def default_report(recipe: recipe_mod.Recipe, ctx: RunContext, result: dict) -> str:
    lines = [
        f"# {recipe.name} run",
        "",
        f"Run directory: `{ctx.run_dir}`",
        "",
        "| output | kind | path |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {a['kind']} | `{a['path']}` |" for n, a in result["outputs"].items()]
    if ctx.summary:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in ctx.summary.items()]
    return "\n".join(lines) + "\n"


def execute(recipe: recipe_mod.Recipe, cfg: recipe_mod.RecipeConfig, run_dir: Path, quiet: bool = False) -> dict:
    """Run the recipe in this process: the only one, or one rank of a torchrun job."""
    ctx = context_from_env(recipe.name, run_dir, quiet=quiet, skills_dir=recipe.skill_dir.parent)
    choice = threads.choose_threads()
    threads.apply(choice)
    ctx.info(f"threads: {choice.threads} ({choice.reason})")
    return run_in(recipe, cfg, ctx)


def run_in(recipe: recipe_mod.Recipe, cfg: recipe_mod.RecipeConfig, ctx: RunContext) -> dict:
    """recipe.run(cfg, ctx) and its result. Every rank checks that the declared outputs came back; rank 0
    alone writes outputs.json (or error.txt), the other ranks return the paths without hashes."""
    started = time.time()
    try:
        if ctx.is_main and cfg.tracking.enabled:
            from skillbook.run.tracking import Trackers

            ctx.trackers = Trackers(cfg.tracking, ctx.run_dir, recipe.name, cfg.model_dump(mode="json"))
        outputs = check_outputs(recipe, recipe.run(cfg, ctx))
        ctx.close()
        if ctx.is_main:
            return finalize(recipe, ctx, outputs, started)
        paths = {name: {"path": str(path), "kind": recipe.OUTPUTS.get(name, "file")} for name, path in outputs.items()}
        return {"skill": recipe.name, "run_dir": str(ctx.run_dir.resolve()), "rank": ctx.rank, "outputs": paths}
    except BaseException as exc:
        ctx.close(failed=True)
        if ctx.is_main:
            (ctx.run_dir / "error.txt").write_text(traceback.format_exc())
            if not isinstance(exc, SkillbookError):
                exc.add_note(f"{ctx.run_dir / 'error.txt'}")
        raise


def prepare(
    recipe: recipe_mod.Recipe,
    cfg: recipe_mod.RecipeConfig,
    runs_dir: Path | None = None,
    run_dir: Path | None = None,
    smoke: dict | None = None,
) -> Path:
    """Create the run directory and write the resolved config (only after validation), and smoke.json if capped."""
    run_dir = run_dir or new_run_dir(recipe.name, cfg, runs_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(recipe_mod.dump(cfg))
    if smoke:
        (run_dir / SMOKE_RECORD).write_text(json.dumps({"env": SMOKE_ENV, "capped": smoke}, indent=2) + "\n")
    return run_dir


def run(
    recipe: recipe_mod.Recipe,
    cfg: recipe_mod.RecipeConfig,
    launcher: Launcher | None = None,
    runs_dir: Path | None = None,
    run_dir: Path | None = None,
    quiet: bool = False,
) -> dict:
    """Run a validated config end to end and return the result dict (also in outputs.json)."""
    launcher = launcher or Launcher()
    cfg, caps = smoke_cap(cfg)
    recipe_mod.check_inputs(recipe, cfg)  # before anything is written
    run_dir = run_dir or new_run_dir(recipe.name, cfg, runs_dir)
    with run_lock(run_dir):
        run_dir = prepare(recipe, cfg, runs_dir, run_dir, smoke=caps)
        if launcher.kind == "local":
            return execute(recipe, cfg, run_dir, quiet=quiet)
        return launch(recipe, launcher, run_dir)


def launch(recipe: recipe_mod.Recipe, launcher: Launcher, run_dir: Path) -> dict:
    """torchrun or accelerate over skillbook.run.worker in run_dir; the result rank 0 wrote."""
    proc = subprocess.run(launcher.argv(run_dir, recipe.skill_dir), stdout=sys.stderr)
    if proc.returncode != 0:
        name = "accelerate launch" if launcher.kind == "accelerate" else "torchrun"
        raise SkillbookError(
            f"{name} exited with {proc.returncode}; see {run_dir / 'error.txt'} and {run_dir / 'log.txt'}"
        )
    return json.loads((run_dir / "outputs.json").read_text())
