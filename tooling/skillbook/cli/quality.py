"""`skills doctor`, `skills examples` and `skills support`: tested-with versions, the code blocks CI executes,
and the skill x model-family support table."""

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
    else:
        click.echo(table, nl=False)


COMMANDS: list[click.Command] = [doctor, examples_cmd, support_cmd]
