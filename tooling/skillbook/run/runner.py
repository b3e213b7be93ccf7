"""Run a recipe: the run directory, metrics, logs, env capture, outputs and launchers.

A run directory `runs/<skill>/<time>-<confighash>/` holds config.yaml, metrics.jsonl,
log.txt, outputs.json, env.json and report.md. Nothing is created before the config
validates. `--launcher torchrun` hands the same run directory to `torch.distributed.run`,
whose workers re-enter through `skillbook.run.worker`; rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from skillbook.errors import SkillbookError
from skillbook.run import recipe as recipe_mod
from skillbook.run import threads

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "tokenizers",
    "sentencepiece",
    "datasets",
    "accelerate",
    "gguf",
    "llama_cpp_python",
    "onnxruntime",
    "vllm",
    "pydantic",
)


def _now() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def config_hash(cfg: recipe_mod.RecipeConfig) -> str:
    """Short hash of the resolved config, ignoring `resume` (a resumed run is the same run)."""
    data = cfg.model_dump(mode="json")
    data.pop("resume", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


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


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name.replace("_", "-")] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def git_sha(root: Path) -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(root: Path) -> dict:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "git_sha": git_sha(root),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    torch = sys.modules.get("torch")  # only describe the device if the recipe already loaded torch
    if torch is not None:
        info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_threads"] = torch.get_num_threads()
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    return info


class Progress:
    """A progress bar on stderr (rich), quiet on non-main ranks."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = None
        self._task = None

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
    """What a recipe gets besides its config: where to write, how to log, who it is."""

    skill: str
    run_dir: Path
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    summary: dict = field(default_factory=dict)
    quiet: bool = False

    def __post_init__(self) -> None:
        self._progress = Progress(enabled=self.is_main and not self.quiet)
        self._t0 = time.time()

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
        record = (
            {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
            if step is not None
            else {"time": round(time.time() - self._t0, 3), **metrics}
        )
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        self._progress.update(step, metrics)

    def report(self, markdown: str) -> None:
        """Write report.md (main rank only)."""
        if self.is_main:
            (self.run_dir / "report.md").write_text(markdown)

    def close(self) -> None:
        self._progress.stop()


def context_from_env(skill: str, run_dir: Path, quiet: bool = False) -> RunContext:
    return RunContext(
        skill=skill,
        run_dir=run_dir,
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        quiet=quiet,
    )


def runs_root(runs_dir: Path | None = None) -> Path:
    return Path(runs_dir or os.environ.get("SKILLBOOK_RUNS") or Path.cwd() / "runs")


def new_run_dir(skill: str, cfg: recipe_mod.RecipeConfig, runs_dir: Path | None = None) -> Path:
    """A fresh run directory, or with `resume: auto` the latest unfinished one with the same config."""
    base = runs_root(runs_dir) / skill
    chash = config_hash(cfg)
    if getattr(cfg, "resume", None) == "auto" and base.is_dir():
        earlier = sorted(p for p in base.glob(f"*-{chash}") if not (p / "outputs.json").exists())
        if earlier:
            return earlier[-1]
    run_dir = base / f"{_now()}-{chash}"
    n = 1
    while run_dir.exists():
        run_dir = base / f"{_now()}-{chash}.{n}"
        n += 1
    return run_dir


def finalize(recipe: recipe_mod.Recipe, ctx: RunContext, outputs: dict, started: float) -> dict:
    """Check the returned artifacts, write outputs.json and env.json, return the result."""
    if not isinstance(outputs, dict):
        raise SkillbookError(f"recipe '{recipe.name}': run() must return a dict of output name -> path")
    missing = sorted(set(recipe.OUTPUTS) - set(outputs))
    if missing:
        raise SkillbookError(f"recipe '{recipe.name}': run() did not return declared outputs {missing}")
    arts = {}
    for name, path in outputs.items():
        path = Path(path)
        if not path.exists():
            raise SkillbookError(f"recipe '{recipe.name}': output '{name}' points at {path}, which does not exist")
        arts[name] = {"path": str(path.resolve()), "kind": recipe.OUTPUTS.get(name, "file"), "sha256": hash_path(path)}
    result = {
        "skill": recipe.name,
        "run_dir": str(ctx.run_dir.resolve()),
        "status": "ok",
        "seconds": round(time.time() - started, 2),
        "outputs": arts,
        "summary": ctx.summary,
    }
    (ctx.run_dir / "env.json").write_text(json.dumps(env_info(recipe.skill_dir.parent.parent), indent=2) + "\n")
    if not (ctx.run_dir / "report.md").exists():
        ctx.report(default_report(recipe, ctx, result))
    (ctx.run_dir / "outputs.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
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
    """Run the recipe in this process (one rank). Rank 0 writes outputs.json; others return {}."""
    ctx = context_from_env(recipe.name, run_dir, quiet=quiet)
    started = time.time()
    choice = threads.choose_threads()
    threads.apply(choice)
    ctx.info(f"threads: {choice.threads} ({choice.reason})")
    try:
        outputs = recipe.run(cfg, ctx)
        ctx.close()
        if not ctx.is_main:
            return {}
        return finalize(recipe, ctx, outputs, started)
    except BaseException:
        ctx.close()
        if ctx.is_main:
            (run_dir / "error.txt").write_text(traceback.format_exc())
        raise


def prepare(
    recipe: recipe_mod.Recipe, cfg: recipe_mod.RecipeConfig, runs_dir: Path | None = None, run_dir: Path | None = None
) -> Path:
    """Create the run directory and write the resolved config (only after validation)."""
    run_dir = run_dir or new_run_dir(recipe.name, cfg, runs_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(recipe_mod.dump(cfg))
    return run_dir


@dataclass
class Launcher:
    """How to start the run: in-process, or torchrun with N processes per node."""

    kind: str = "local"
    nproc_per_node: int = 1
    nnodes: str | None = None
    rdzv_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("local", "torchrun"):
            raise SkillbookError(f"--launcher {self.kind!r}: use 'local' or 'torchrun'")
        if self.nproc_per_node < 1:
            raise SkillbookError("--nproc-per-node must be at least 1")

    def torchrun_argv(self, run_dir: Path, skill_dir: Path) -> list[str]:
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc_per_node}"]
        if self.nnodes:
            argv.append(f"--nnodes={self.nnodes}")
        if self.rdzv_endpoint:
            argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}"]
        else:
            argv.append("--standalone")
        return argv + ["-m", "skillbook.run.worker", str(run_dir), str(skill_dir)]


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
    recipe_mod.check_inputs(recipe, cfg)  # before anything is written
    run_dir = prepare(recipe, cfg, runs_dir, run_dir)
    if launcher.kind == "local":
        return execute(recipe, cfg, run_dir, quiet=quiet)
    proc = subprocess.run(launcher.torchrun_argv(run_dir, recipe.skill_dir), stdout=sys.stderr)
    if proc.returncode != 0:
        raise SkillbookError(
            f"torchrun exited with {proc.returncode}; see {run_dir / 'error.txt'} and {run_dir / 'log.txt'}"
        )
    return json.loads((run_dir / "outputs.json").read_text())
