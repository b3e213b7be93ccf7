"""`skills doctor`, `skills examples`, `skills support` and `skills measured`: tested-with versions, the code
blocks CI executes, the skill x model-family support table and the measured tables' recorded runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command()
@click.argument("names", nargs=-1)
@click.option(
    "--update", is_flag=True, help="Run the recipe and examples of NAMES, then record the installed versions."
)
@click.option("--no-run", is_flag=True, help="With --update: record without running (only when CI just passed).")
@click.option("--package", "packages", multiple=True, metavar="DIST", help="With --update: also record DIST.")
@click.option("--strict", is_flag=True, help="Exit 1 when any skill is stale, untested or invalid.")
@click.option("--json", "as_json", is_flag=True)
def doctor(names, update, no_run, packages, strict, as_json) -> None:
    """Tested-with versions vs installed ones, and executed/marked blocks per skill."""
    from skillbook import catalog
    from skillbook.catalog import codeblocks, versions

    skills = [catalog.find(n) for n in names] if names else catalog.load_all()
    if update:
        if not names:
            raise click.UsageError("--update needs the skill names to record (it runs their examples first)")
        for skill in skills:
            if not no_run:
                _verify(skill)
            spec = versions.update(catalog.load_skill(skill.path), list(packages))
            click.echo(f'{skill.name}: tested-with "{spec}"', err=True)
        skills = [catalog.load_skill(s.path) for s in skills]
    rows = [{**versions.check(s).as_dict(), "blocks": codeblocks.counts(s)} for s in skills]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(f"{'skill':<24} {'state':<9} {'run/marked':<11} tested-with")
        for s, row in zip(skills, rows):
            status = versions.check(s)
            blocks = f"{row['blocks']['executed']}/{row['blocks']['marked']}"
            click.echo(f"{s.name:<24} {status.state:<9} {blocks:<11} {status.describe()}")
        stale = [r["skill"] for r in rows if r["state"] == "stale"]
        if stale:
            click.echo(f"stale: {', '.join(stale)}; re-run their examples and `skills doctor --update NAME`", err=True)
    bad = [r for r in rows if r["state"] != "ok"]
    sys.exit(1 if strict and bad else 0)


def _verify(skill) -> None:
    """The recipe's default config and every executed block must pass before versions are recorded."""
    import tempfile

    from skillbook.errors import SkillbookError
    from skillbook.run import examples, recipe, runner

    if skill.has_recipe:
        rec = recipe.load(skill.path)
        # a required model input (dpo, serving, ...) gets the fixture layer's tiny pretrained model
        required = [n for n, f in rec.Config.model_fields.items() if f.is_required()]
        missing = [n for n in required if "hf-model" not in rec.INPUTS.get(n, "")]
        if missing:
            raise SkillbookError(f"{skill.name}: the default config needs {', '.join(missing)}; cannot verify it alone")
        sets = {}
        if required:
            model = examples.Fixtures(examples.default_cache()).ensure(
                {"SKILLBOOK_MODEL"}, log=lambda m: click.echo(m, err=True)
            )
            sets = {name: model["SKILLBOOK_MODEL"] for name in required}
        click.echo(f"{skill.name}: running the recipe's default config" + (f" on {sets}" if sets else ""), err=True)
        with tempfile.TemporaryDirectory() as tmp:
            runner.run(rec, recipe.resolve(rec, overrides=sets), runs_dir=Path(tmp), quiet=True)
    results = examples.run_skills([skill.name], log=lambda m: click.echo(m, err=True))
    failed = [r for r in results if not r.ok]
    if failed:
        raise SkillbookError("examples failed; tested-with not updated:\n" + "\n".join(r.message() for r in failed))


@click.command("examples")
@click.argument("names", nargs=-1)
@click.option("--timeout", type=float, default=None, help="Seconds per block (default 120).")
@click.option("--json", "as_json", is_flag=True)
def examples_cmd(names, timeout, as_json) -> None:
    """Run the executed code blocks of skills (what CI runs), with the fixture artifacts they need."""
    from skillbook.run import examples

    results = examples.run_skills(list(names), timeout=timeout, log=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        for r in results:
            click.echo(f"ok    {r.example.where()} ({r.seconds:.1f} s)" if r.ok else f"FAIL  {r.message()}")
        failed = sum(not r.ok for r in results)
        click.echo(f"{len(results) - failed} passed, {failed} failed", err=True)
    sys.exit(1 if any(not r.ok for r in results) else 0)


@click.command("support")
@click.option("--write", is_flag=True, help="Rewrite README.md's support table from the published results.")
@click.option(
    "--check",
    "fresh",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Results of a fresh family-matrix run: exit 1 where they disagree with the published table.",
)
def support_cmd(write: bool, fresh: Path | None) -> None:
    """The skill x model-family table from the family-matrix tests (`make support` refreshes it)."""
    from skillbook import catalog
    from skillbook.catalog import support
    from skillbook.errors import SkillbookError

    root = catalog.repo_root()
    published_path = root / support.RESULTS
    if not published_path.is_file():
        raise SkillbookError(f"{published_path} is missing; run `make support` to measure the family matrix")
    published = support.load(published_path)
    if fresh is not None:
        problems = support.disagreements(published, support.load(fresh))
        if problems:
            raise SkillbookError(
                "the published support table disagrees with this run; fix the skill or run `make support`:\n  "
                + "\n  ".join(problems)
            )
        click.echo(f"support table agrees with {fresh}", err=True)
        return
    table = support.markdown_table(published)
    if write:
        readme = root / "README.md"
        try:
            text = support.with_table(readme.read_text(encoding="utf-8"), table)
        except ValueError as exc:
            raise SkillbookError(str(exc)) from None
        readme.write_text(text, encoding="utf-8")
        click.echo(f"wrote the support table into {readme}", err=True)
        for skill_dir in catalog.skill_dirs(root):  # per-family values blocks (e.g. quantization's families)
            doc = skill_dir / "SKILL.md"
            before = doc.read_text(encoding="utf-8") if doc.is_file() else ""
            if "<!-- support-values:start " not in before:
                continue
            try:
                after = support.with_values(before, published)
            except ValueError as exc:
                raise SkillbookError(f"{doc.relative_to(root)}: {exc}") from None
            if after != before:
                doc.write_text(after, encoding="utf-8")
                click.echo(f"wrote the family values into {doc.relative_to(root)}", err=True)
    else:
        click.echo(table, nl=False)


@click.command("measured")
@click.argument("names", nargs=-1)
@click.option("--record", "do_record", is_flag=True, help="Copy a run's numbers into NAME's record and its doc.")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="With --record: the run to copy (default runs/NAME/latest; for a pipeline its newest run).",
)
@click.option("--keys", default=None, help="With --record, for a skill with no record yet: summary keys, one row each.")
@click.option("--write", is_flag=True, help="Regenerate the measured blocks of NAMES (default all) from their records.")
@click.option(
    "--rerun",
    is_flag=True,
    help="Run the recorded command of NAMES (default all; the records they read runs of come too) again, "
    "inputs first, in --workdir, and record each.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --rerun: an empty directory for the runs (default ./measured-runs-<time>).",
)
def measured_cmd(names, do_record, run_dir, keys, write, rerun, workdir) -> None:
    """Measured tables with provenance: each comes from one recorded run (skills/NAME/measured.json, or
    recipes/NAME.measured.json for a pipeline such as the README's speedrun)."""
    from skillbook import catalog
    from skillbook.catalog import measured, versions

    root = catalog.repo_root()
    pipelines = {p.name.removesuffix(measured.PIPELINE_SUFFIX): p for p in measured.pipeline_records(root)}
    wanted = [n for n in names if n not in pipelines]
    skills = [catalog.find(n) for n in wanted] if names else catalog.load_all()
    if rerun:
        _rerun(root, list(names), pipelines, workdir)
        return
    if do_record:
        if len(names) != 1:
            raise click.UsageError("--record takes exactly one skill or pipeline NAME")
        if names[0] in pipelines:
            _record_pipeline(root, names[0], pipelines[names[0]], run_dir)
        else:
            _record_skill(skills[0], run_dir, keys)
        return
    bad = 0
    rows = [(s.name, s.path / measured.RECORD, s.skill_md) for s in skills if (s.path / measured.RECORD).is_file()]
    for name, path in pipelines.items():
        if not names or name in names:
            rows.append((name, path, measured.pipeline_doc(root, measured.load_pipeline_record(path))))
    for name, path, doc in rows:
        record = measured.load_pipeline_record(path) if name in pipelines else measured.load_file(path)
        if write and record["provenance"]:
            doc.write_text(measured.with_block(doc.read_text(encoding="utf-8"), record), encoding="utf-8")
        if name in pipelines:
            found = measured.pipeline_problems(root, path)
        else:
            skill = catalog.load_skill(path.parent)
            found = measured.problems(skill.path, doc.read_text(encoding="utf-8"), versions.recorded(skill))
        bad += sum(severity == "error" for _, severity, _ in found)
        prov = record["provenance"]
        state = "; ".join(f"{code} {message}" for code, _, message in found) or "ok"
        click.echo(f"{name:<24} {prov.get('run', '-'):<28} {prov.get('dtype', '-'):<9} {state}")
    sys.exit(1 if bad else 0)


def _record_skill(skill, run_dir: Path | None, keys: str | None) -> None:
    """A skill's run -> skills/NAME/measured.json and the block in its SKILL.md (both or neither written)."""
    from skillbook.catalog import measured
    from skillbook.errors import SkillbookError
    from skillbook.run import rundirs

    layout = measured.load(skill.path) or (measured.layout_from_keys(keys.split(",")) if keys else None)
    if layout is None:
        raise SkillbookError(f"{skill.name} has no {measured.RECORD} yet: pass --keys KEY,KEY from its summary")
    run = run_dir or rundirs.runs_root() / skill.name / rundirs.LATEST
    fresh = measured.from_run(layout, run.resolve(), skill.name, _command(skill, run), skill.path / "recipe.py")
    text = measured.with_block(skill.skill_md.read_text(encoding="utf-8"), fresh)  # fails before any write
    (skill.path / measured.RECORD).write_text(json.dumps(fresh, indent=2) + "\n", encoding="utf-8")
    skill.skill_md.write_text(text, encoding="utf-8")
    click.echo(f"{skill.name}: recorded {run.resolve().name} into {measured.RECORD} and SKILL.md", err=True)


def _record_pipeline(root: Path, name: str, path: Path, run_dir: Path | None) -> None:
    """A pipeline's run (every step run fresh) -> its record and the block in the doc the record names."""
    from skillbook.catalog import measured
    from skillbook.errors import SkillbookError
    from skillbook.run import pipeline, rundirs

    layout = measured.load_pipeline_record(path)
    spec = measured.pipeline_spec(root, path, layout)
    spec_name = pipeline.load_spec(spec).name
    if run_dir is None:
        done = sorted((rundirs.runs_root() / "pipelines" / spec_name).glob("*/pipeline.json"))
        if not done:
            raise SkillbookError(f"no run of pipeline {spec_name} under {rundirs.runs_root()}: run it first")
        run_dir = done[-1].parent
    command = f"skills run {spec_name if spec.parent == root / 'recipes' else spec.relative_to(root)}"
    fresh = measured.from_pipeline(layout, run_dir.resolve(), name, spec, command)
    doc = measured.pipeline_doc(root, fresh)
    text = measured.with_block(doc.read_text(encoding="utf-8"), fresh)
    path.write_text(json.dumps(fresh, indent=2) + "\n", encoding="utf-8")
    doc.write_text(text, encoding="utf-8")
    click.echo(f"{name}: recorded {run_dir.resolve().name} into {path.name} and {doc.name}", err=True)


def _rerun(root: Path, names: list[str], pipelines: dict[str, Path], workdir: Path | None) -> None:
    """Every chosen record's command, run again in an order where the runs it reads come first, then recorded:
    one command regenerates every measured table (each record is written whole or not at all)."""
    import os
    import shlex
    import subprocess
    import time

    from skillbook import catalog
    from skillbook.catalog import measured
    from skillbook.errors import SkillbookError

    commands, specs = {}, {}
    for skill in catalog.load_all():
        record = measured.load(skill.path)
        if record and record["provenance"]:
            commands[skill.name] = record["provenance"]["command"]
    for name, path in pipelines.items():
        record = measured.load_file(path)
        specs[name] = measured.pipeline_spec(root, path, record)
        commands[name] = record["provenance"].get("command") or f"skills run {specs[name]}"
    unknown = sorted(set(names) - set(commands))
    if unknown:
        raise SkillbookError(f"no measured record for {', '.join(unknown)}; records: {', '.join(sorted(commands))}")
    order = measured.rerun_order(
        {n: commands[n] for n in (measured.with_inputs(names, commands) if names else commands)}
    )
    workdir = (workdir or Path.cwd() / time.strftime("measured-runs-%Y%m%d-%H%M%S")).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        raise SkillbookError(f"--workdir {workdir} is not empty: reruns start from nothing, so give an empty one")
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("SKILLBOOK_RUNS", "SKILLBOOK_SMOKE_STEPS")}
    ran: dict[Path, Path] = {}  # a pipeline file -> its runs dir (the sweeps share one pipeline run)
    for i, name in enumerate(order, 1):
        if name in specs:
            runs = ran.get(specs[name]) or workdir / "pipelines" / specs[name].stem
            argv = ["run", str(specs[name]), "--runs-dir", str(runs)]
        else:
            runs, argv = workdir / "runs" / name, shlex.split(commands[name])[1:]
        click.echo(f"[{i}/{len(order)}] {name}: {commands[name]}", err=True)
        if not (name in specs and specs[name] in ran):
            done = subprocess.run([sys.executable, "-m", "skillbook.cli", *argv], cwd=workdir, env=env, text=True,
                                  capture_output=True)  # fmt: skip
            if done.returncode != 0:
                raise SkillbookError(f"{name}: `{commands[name]}` failed in {workdir}:\n{done.stderr[-1500:]}")
        if name in specs:
            ran[specs[name]] = runs
            _record_pipeline(root, name, pipelines[name], sorted(runs.glob("pipelines/*/*/pipeline.json"))[-1].parent)
        else:
            _record_skill(catalog.find(name), runs / "latest", None)


def _command(skill, run_dir: Path) -> str:
    """`skills run NAME --set k=v ...`: the required fields and those where config.yaml differs from the defaults."""
    from skillbook.run import recipe

    if not skill.has_recipe:
        return f"skills run {skill.name}"
    rec = recipe.load(skill.path)
    used = recipe.read_yaml(run_dir / "config.yaml", "the run's config.yaml")
    required = {n: used[n] for n, f in rec.Config.model_fields.items() if f.is_required() and n in used}
    defaults = recipe.resolve(rec, overrides=required).model_dump(mode="json")  # the skill's own layers too
    sets = []
    for key, value in _flat(used).items():
        required_field = key.split(".", 1)[0] in required  # no default: always part of the command
        if key != "resume" and (required_field or _flat(defaults).get(key, object()) != value):
            shown = str(value)
            if "/runs/" in shown:  # a path to an earlier run: from runs/ on, as the docs write it
                shown = "runs/" + shown.split("/runs/", 1)[1]
            sets.append(f"--set {key}={shown}")
    return " ".join([f"skills run {skill.name}", *sets])


def _flat(data: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


COMMANDS: list[click.Command] = [doctor, examples_cmd, support_cmd, measured_cmd]
