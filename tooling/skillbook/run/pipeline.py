"""Pipelines: recipes/<name>.yaml chains skills; `${steps.<id>.<output>}` wires outputs to inputs.

`validate` checks the whole DAG (skills, presets, step configs, references, artifact kinds) and
returns every problem at once. `run` executes steps in order with a step cache: each step's key
is recipe source (plus the skillbook.ml modules it imports) + resolved config + input artifact
hashes, its run directory is `<runs>/cache/<skill>/<key>/`, and a directory with outputs.json is a
finished step that a rerun reuses. A failed or killed pipeline therefore resumes at the step that did not finish.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skillbook import catalog
from skillbook.errors import ConfigError, SkillbookError
from skillbook.run import recipe as recipe_mod
from skillbook.run import rundirs, runner

REF_RE = re.compile(r"\$\{steps\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\}")


class StepSpec(BaseModel):
    """One pipeline step: a skill run with a config, possibly referring to earlier outputs."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Step id, unique in the pipeline.")
    skill: str = Field(..., description="Skill folder name under skills/.")
    preset: str | None = Field(None, description="Preset from the skill's configs/ folder.")
    config: dict = Field(default_factory=dict, description="Config fields; values may be ${steps.<id>.<output>}.")
    label: str | None = Field(None, description="Column name in the run report (e.g. 'base', 'sft').")


class PipelineSpec(BaseModel):
    """A pipeline file under recipes/."""

    model_config = ConfigDict(extra="forbid", title="Skillbook pipeline")
    name: recipe_mod.SafeName = Field(..., description="Pipeline name (the file stem; a plain file name).")
    description: str = Field(..., description="What the pipeline produces and when to run it.")
    report: bool = Field(True, description="Write a side-by-side run report with plots at the end.")
    steps: list[StepSpec] = Field(..., min_length=1)


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def load_spec(path: Path) -> PipelineSpec:
    data = recipe_mod.read_yaml(path, "pipeline")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(recipe_mod.format_validation(exc, PipelineSpec, f"pipeline {path.name}")) from None


def refs_in(value) -> list[tuple[str, str]]:
    """Every (step, output) reference inside a config value (strings, lists, dicts)."""
    if isinstance(value, str):
        return REF_RE.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in refs_in(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs_in(v)]
    return []


def reference_name(step_id: str, out: str) -> str:
    """A stand-in path for ${steps.ID.OUT}: validation resolves configs with it, and cache keys hash it."""
    return f"/pipeline/{step_id}/{out}"


def substitute(value, resolve):
    """Replace each reference with resolve(step, output) (recursively)."""
    if isinstance(value, str):
        return REF_RE.sub(lambda m: str(resolve(m.group(1), m.group(2))), value)
    if isinstance(value, dict):
        return {k: substitute(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, resolve) for v in value]
    return value


def step_overrides(spec: PipelineSpec, sets: list[str]) -> dict[str, list[str]]:
    """`--set step.field=value` for pipelines: split by step id."""
    by_step: dict[str, list[str]] = {}
    ids = [s.id for s in spec.steps]
    for item in sets:
        step, _, rest = item.partition(".")
        if step not in ids or not rest:
            near = difflib.get_close_matches(step, ids, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; steps: {', '.join(ids)}"
            raise ConfigError(f"--set {item!r}: pipelines take STEP.field=value and '{step}' is not a step{hint}")
        by_step.setdefault(step, []).append(rest)
    return by_step


def validate(spec: PipelineSpec, root: Path, where: str = "pipeline", sets: list[str] | None = None) -> list[str]:
    """Every problem in the pipeline, without running anything."""
    problems: list[str] = []
    recipes: dict[str, recipe_mod.Recipe] = {}
    known = [p.name for p in catalog.skill_dirs(root)]
    try:
        overrides = step_overrides(spec, sets or [])
    except ConfigError as exc:
        return [str(exc)]
    seen: set[str] = set()
    for step in spec.steps:
        at = f"{where}: step '{step.id}'"
        if step.id in seen:
            problems.append(f"{at}: duplicate step id")
            continue
        seen.add(step.id)
        if step.skill not in known:
            near = difflib.get_close_matches(step.skill, known, n=1)
            problems.append(f"{at}: unknown skill '{step.skill}'" + (f"; did you mean '{near[0]}'?" if near else ""))
            continue
        try:
            rec = recipe_mod.load(root / "skills" / step.skill)
        except Exception as exc:  # noqa: BLE001 - a broken recipe is one more problem to list
            problems.append(f"{at}: recipe cannot be loaded: {exc}")
            continue
        for ref_step, out in refs_in(step.config):
            if ref_step == step.id:
                problems.append(
                    f"{at}: ${{steps.{ref_step}.{out}}} refers to the step itself; use an earlier step's output"
                )
                continue
            if ref_step in seen and ref_step not in recipes:
                continue  # that step's own problem is already listed
            if ref_step not in recipes:
                later = any(s.id == ref_step for s in spec.steps)
                problems.append(
                    f"{at}: ${{steps.{ref_step}.{out}}} refers to "
                    + ("a later step; steps run in file order" if later else f"no step called '{ref_step}'")
                )
            elif out not in recipes[ref_step].OUTPUTS:
                problems.append(
                    f"{at}: step '{ref_step}' ({recipes[ref_step].name}) has no output '{out}'; "
                    f"it has {', '.join(recipes[ref_step].OUTPUTS)}"
                )
        for fld, value in step.config.items():
            refs = refs_in(value)
            if not refs or not isinstance(value, str) or not REF_RE.fullmatch(value):
                continue
            ref_step, out = refs[0]
            if ref_step in recipes and out in recipes[ref_step].OUTPUTS:
                have, want = recipes[ref_step].OUTPUTS[out], rec.INPUTS.get(fld)
                if want is None:
                    problems.append(
                        f"{at}: field '{fld}' does not take an artifact (inputs: {', '.join(rec.INPUTS) or 'none'})"
                    )
                elif have not in want.split("|"):  # INPUTS may accept several kinds: "gguf|hf-model"
                    problems.append(f"{at}: field '{fld}' wants a {want} but ${{steps.{ref_step}.{out}}} is a {have}")
        placeholder = substitute(step.config, reference_name)
        try:
            recipe_mod.resolve(rec, preset=step.preset, overrides=placeholder, sets=overrides.get(step.id))
        except ConfigError as exc:
            problems.append(f"{at}: {exc}".replace("\n", "\n    "))
        recipes[step.id] = rec
    return problems


def validate_file(path: Path, root: Path | None = None) -> list[str]:
    try:
        spec = load_spec(path)
    except SkillbookError as exc:
        return [str(exc)]
    problems = validate(spec, root or catalog.repo_root(), path.name)
    if spec.name != path.stem:
        problems.append(f"{path.name}: name '{spec.name}' must equal the file name '{path.stem}'")
    return problems


# ---------------------------------------------------------------------------------------------
# Running with the step cache
# ---------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    id: str
    skill: str
    key: str
    run_dir: str
    status: str  # "cached" | "ran" | "failed" | "planned"
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    label: str | None = None


def step_key(rec: recipe_mod.Recipe, cfg: recipe_mod.RecipeConfig, input_hashes: list[str]) -> str:
    h = hashlib.sha256()
    h.update(rec.code_text().encode())
    h.update(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    for digest in input_hashes:
        h.update(digest.encode())
    return h.hexdigest()[:16]


def dependents(spec: PipelineSpec, forced: list[str]) -> set[str]:
    """The forced steps and everything downstream of them."""
    ids = {s.id for s in spec.steps}
    unknown = [f for f in forced if f not in ids]
    if unknown:
        raise ConfigError(f"--force {unknown[0]!r}: no such step; steps: {', '.join(s.id for s in spec.steps)}")
    out = set(forced)
    for step in spec.steps:
        if {s for s, _ in refs_in(step.config)} & out:
            out.add(step.id)
    return out


def run_file(
    path: Path,
    runs_dir: Path | None = None,
    force: list[str] | None = None,
    dry_run: bool = False,
    sets: list[str] | None = None,
    quiet: bool = False,
) -> dict:
    """Validate the whole pipeline, then run (or plan) its steps; returns the pipeline record.

    Long: each step resolves, keys, reuses or runs in order, with the record written on failure too; the
    loop reads best whole."""
    root = catalog.repo_root()
    spec = load_spec(path)
    problems = validate(spec, root, path.name, sets)
    if problems:
        raise ConfigError(
            f"pipeline {path.name} has {len(problems)} problem(s); nothing was run:\n- " + "\n- ".join(problems)
        )
    forced = dependents(spec, force or [])
    overrides = step_overrides(spec, sets or [])
    base = rundirs.runs_root(runs_dir)
    record_dir = base / "pipelines" / spec.name / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    results: dict[str, StepResult] = {}
    started = time.time()

    def resolve_ref(step_id: str, out: str) -> str:
        if step_id not in results or not results[step_id].outputs:
            return f"/planned/{step_id}/{out}"
        return results[step_id].outputs[out]["path"]

    for step in spec.steps:
        rec = recipe_mod.load(root / "skills" / step.skill)
        cfg = recipe_mod.resolve(
            rec, step.preset, overrides=substitute(step.config, resolve_ref), sets=overrides.get(step.id)
        )
        hashes = [results[s].outputs[o]["sha256"] for s, o in refs_in(step.config) if results[s].outputs]
        # The key sees a reference as its name and the input by its content hash, never as a path under
        # this runs dir: the same pipeline in another runs dir (or a moved one) reuses every step.
        by_name = recipe_mod.resolve(
            rec, step.preset, overrides=substitute(step.config, reference_name), sets=overrides.get(step.id)
        )
        key = step_key(rec, by_name, hashes)
        run_dir = base / "cache" / step.skill / key
        res = StepResult(step.id, step.skill, key, str(run_dir), "planned", label=step.label)
        results[step.id] = res
        done = run_dir / "outputs.json"
        if step.id in forced and run_dir.exists():
            shutil.rmtree(run_dir)
        if done.exists():
            prior = json.loads(done.read_text())
            res.status, res.outputs, res.summary, res.seconds = (
                "cached",
                prior["outputs"],
                prior.get("summary", {}),
                prior.get("seconds", 0),
            )
            _say(quiet, f"[{step.id}] cached ({step.skill}, {key})")
            continue
        if dry_run:
            _say(quiet, f"[{step.id}] would run {step.skill} ({key})")
            continue
        if run_dir.exists() and getattr(cfg, "resume", None) != "auto":
            shutil.rmtree(run_dir)  # an unfinished attempt: start the step clean
        _say(quiet, f"[{step.id}] running {step.skill} -> {run_dir}")
        t0 = time.time()
        try:
            out = runner.run(rec, cfg, run_dir=run_dir, quiet=quiet)
        except BaseException:
            res.status, res.seconds = "failed", round(time.time() - t0, 2)
            _write_record(record_dir, spec, results, started, "failed")
            raise
        res.status, res.outputs, res.summary, res.seconds = (
            "ran",
            out["outputs"],
            out.get("summary", {}),
            round(time.time() - t0, 2),
        )
    status = "planned" if dry_run else "ok"
    record = _write_record(record_dir, spec, results, started, status)
    if spec.report and not dry_run:
        from skillbook.run.report import write_report

        record["report"] = str(write_report(record_dir, spec, record))
        (record_dir / "pipeline.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        import sys

        print(message, file=sys.stderr, flush=True)


def _write_record(record_dir: Path, spec: PipelineSpec, results: dict, started: float, status: str) -> dict:
    record = {
        "pipeline": spec.name,
        "status": status,
        "run_dir": str(record_dir),
        "seconds": round(time.time() - started, 2),
        "steps": [vars(r) for r in results.values()],
    }
    if status != "planned":
        record_dir.mkdir(parents=True, exist_ok=True)
        (record_dir / "pipeline.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def describe(record: dict) -> str:
    lines = [f"pipeline {record['pipeline']}: {record['status']} in {record['seconds']:.1f}s"]
    for s in record["steps"]:
        lines.append(f"  {s['id']:<14} {s['skill']:<18} {s['status']:<7} {s['seconds']:>7.1f}s  {s['run_dir']}")
    if record.get("report"):
        lines.append(f"report: {record['report']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Past runs and cache garbage collection
# ---------------------------------------------------------------------------------------------


def list_runs(runs_dir: Path | None = None) -> list[dict]:
    """Pipeline runs (newest first) and standalone skill runs, with status."""
    base = rundirs.runs_root(runs_dir)
    out = []
    for rec in sorted(base.glob("pipelines/*/*/pipeline.json"), reverse=True):
        data = json.loads(rec.read_text())
        out.append(
            {
                "kind": "pipeline",
                "name": data["pipeline"],
                "status": data["status"],
                "seconds": data["seconds"],
                "path": str(rec.parent),
            }
        )
    for skill_dir in (
        sorted(p for p in base.iterdir() if p.is_dir() and p.name not in ("cache", "pipelines"))
        if base.is_dir()
        else []
    ):
        for run_dir in sorted((p for p in skill_dir.iterdir() if not p.is_symlink()), reverse=True):  # not latest
            out.append(
                {
                    "kind": "skill",
                    "name": skill_dir.name,
                    "path": str(run_dir),
                    "status": "ok" if (run_dir / "outputs.json").exists() else "unfinished",
                }
            )
    return out


def gc(runs_dir: Path | None = None, dry_run: bool = False) -> list[Path]:
    """Remove cache entries that the latest run of each pipeline does not use, and failed skill runs
    (error.txt without outputs.json) that no live run holds."""
    base = rundirs.runs_root(runs_dir)
    keep: set[str] = set()
    for pipe in (base / "pipelines").glob("*") if (base / "pipelines").is_dir() else []:
        records = sorted(pipe.glob("*/pipeline.json"))
        if records:
            keep |= {str(Path(s["run_dir"]).resolve()) for s in json.loads(records[-1].read_text())["steps"]}
    removed = []
    for entry in sorted((base / "cache").glob("*/*")) if (base / "cache").is_dir() else []:
        if str(entry.resolve()) not in keep:
            removed.append(entry)
            if not dry_run:
                shutil.rmtree(entry)
    for run_dir in rundirs.failed_runs(runs_dir):
        removed.append(run_dir)
        if not dry_run:
            shutil.rmtree(run_dir)
    return removed
