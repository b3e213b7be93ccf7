"""The `skills` command: a thin click layer over the library. No torch at start-up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from skillbook import catalog
from skillbook.catalog.frontmatter import NAME_RE
from skillbook.errors import SkillbookError, SkillNotFound


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turn SkillbookError anywhere below into one message and exit 2; anything else (a bug, or a library
    error no check anticipated) into one line naming it and where its traceback went, exit 1.
    SKILLBOOK_TRACEBACK=1 re-raises instead, for debugging."""

    def invoke(self, ctx):  # noqa: D401
        import os

        try:
            return super().invoke(ctx)
        except SkillbookError as exc:
            _fail(exc)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if os.environ.get("SKILLBOOK_TRACEBACK") == "1":
                raise
            where = "; ".join(getattr(exc, "__notes__", [])) or "set SKILLBOOK_TRACEBACK=1 to print it"
            click.echo(f"error: unexpected {type(exc).__name__}: {str(exc)[:500]} (traceback: {where})", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="skillbook")
def main() -> None:
    """Skillbook: LLM research skills you can read and run."""


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable catalog.")
def list_cmd(as_json: bool) -> None:
    """List skills and pipelines."""
    idx = catalog.index()
    if as_json:
        click.echo(json.dumps(idx, indent=2))
        return
    for s in idx["skills"]:
        first = s["description"].split(". ")[0].rstrip(".")
        click.echo(f"{s['name']:<22} {s['stage']:<14} {first[:90]}")
    if idx["pipelines"]:
        click.echo("\npipelines: " + ", ".join(idx["pipelines"]))


@main.command()
@click.argument("name")
@click.option("--references", is_flag=True, help="Append every reference file.")
@click.option("--json", "as_json", is_flag=True)
def show(name: str, references: bool, as_json: bool) -> None:
    """Print a skill's SKILL.md (and references)."""
    skill = catalog.find(name)
    refs = {p.name: p.read_text() for p in skill.references} if references else {}
    if as_json:
        click.echo(json.dumps({**skill.summary(), "body": skill.body, "references_text": refs}, indent=2))
        return
    click.echo(skill.text)
    for fname, text in refs.items():
        click.echo(f"\n---- references/{fname} ----\n{text}")


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--rules", is_flag=True, help="List the rules and their codes, then exit.")
def lint(paths: tuple[Path, ...], fmt: str, rules: bool) -> None:
    """Check skills, recipes, pipelines and schemas; exit 1 on errors."""
    from skillbook import lint as lint_mod

    if rules:  # each rule's docstring starts with the codes it yields
        for rule in [*lint_mod.SKILL_RULES, *lint_mod.REPO_RULES]:
            click.echo((rule.__doc__ or rule.__name__).strip().splitlines()[0])
        click.echo("SB999: a rule itself failed on this input (report it with the file)")
        return
    findings = lint_mod.lint_paths(list(paths)) if paths else lint_mod.lint_repo()
    if fmt == "json":
        click.echo(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for f in findings:
            click.echo(str(f))
        errors = sum(f.severity == "error" for f in findings)
        click.echo(f"{errors} error(s), {len(findings) - errors} warning(s)", err=True)
    sys.exit(1 if any(f.severity == "error" for f in findings) else 0)


def _pipeline_target(name: str, root: Path) -> Path | None:
    """A pipeline by name from recipes/, or by an explicit path that ends in .yaml/.yml and exists; else None."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise SkillNotFound(f"pipeline file {name} does not exist")
        return path
    path = root / "recipes" / f"{name}.yaml"
    if NAME_RE.match(name) and path.is_file() and not (root / "skills" / name).is_dir():
        return path
    return None


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("name")
@click.option("--preset", help="A preset from the skill's configs/ folder.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="A YAML config file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one field (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and planned outputs; run nothing.")
@click.option(
    "--launcher",
    type=click.Choice(["local", "torchrun", "accelerate"]),
    default="local",
    help="local: this process; torchrun or accelerate: N processes (accelerate for the Trainer-based recipes).",
)
@click.option("--nproc-per-node", type=int, default=None, help="Processes per node (default 1).")
@click.option("--nnodes", default=None)
@click.option("--rdzv-endpoint", default=None, help="HOST:PORT of node 0 (multi-node).")
@click.option("--max-restarts", type=int, default=0, help="Restart failed workers this often (elastic).")
@click.option(
    "--accelerate-config",
    type=click.Path(path_type=Path),
    default=None,
    help="An accelerate YAML (DDP, FSDP, DeepSpeed, mixed precision); with --launcher accelerate.",
)
@click.option(
    "--runs-dir", type=click.Path(path_type=Path), default=None, help="Where run directories go (default ./runs)."
)
@click.option("--force", "force", multiple=True, metavar="STEP", help="Pipelines: rerun STEP and what depends on it.")
def run(
    name,
    preset,
    config_file,
    sets,
    as_json,
    dry_run,
    launcher,
    nproc_per_node,
    nnodes,
    rdzv_endpoint,
    max_restarts,
    accelerate_config,
    runs_dir,
    force,
):
    """Run a skill's recipe, or a pipeline from recipes/."""
    from skillbook.run import recipe as recipe_mod
    from skillbook.run import runner

    root = catalog.repo_root()
    pipeline_path = _pipeline_target(name, root)
    if pipeline_path is not None:
        from skillbook.run import pipeline

        result = pipeline.run_file(
            pipeline_path, runs_dir=runs_dir, force=list(force), dry_run=dry_run, sets=list(sets)
        )
        click.echo(json.dumps(result, indent=2) if as_json else pipeline.describe(result))
        return
    try:
        skill = catalog.find(name, root)
    except SkillNotFound as exc:
        pipelines = ", ".join(p.stem for p in catalog.pipeline_files(root)) or "none"
        raise SkillNotFound(f"{exc}; known pipelines: {pipelines} (or a pipeline file path ending in .yaml)") from exc
    launch = runner.Launcher(launcher, nproc_per_node, nnodes, rdzv_endpoint, max_restarts, accelerate_config)
    rec = recipe_mod.load(skill.path)
    cfg = recipe_mod.resolve(rec, preset=preset, config_file=config_file, sets=list(sets))
    if dry_run:
        plan = {"skill": name, "config": cfg.model_dump(mode="json"), "outputs": rec.OUTPUTS}
        click.echo(
            json.dumps(plan, indent=2)
            if as_json
            else recipe_mod.dump(cfg) + "outputs:\n" + "".join(f"  {k}: {v}\n" for k, v in rec.OUTPUTS.items()),
            nl=False,
        )
        return
    result = runner.run(rec, cfg, launch, runs_dir=runs_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"run directory: {result['run_dir']}")
        for out, art in result["outputs"].items():
            click.echo(f"  {out} ({art['kind']}): {art['path']}")


@main.command()
@click.argument("name")
@click.option("--description", default=None, help="What the skill does and when to use it.")
@click.option("--stage", type=click.Choice(catalog.STAGES), default="other")
def new(name: str, description: str | None, stage: str) -> None:
    """Scaffold a skill with a runnable recipe; the repo stays lint-clean (its schema and the marketplace
    file are regenerated with it)."""
    from skillbook.agent.marketplace import write_marketplace
    from skillbook.catalog import scaffold
    from skillbook.run import schemas

    path = scaffold.new_skill(name, description=description, stage=stage)
    schemas.write()
    write_marketplace()
    click.echo(f"created {path} (+ its schema, the marketplace file); next: edit SKILL.md, then `skills lint` "
               f"and `skills run {name}`")  # fmt: skip


@main.command()
@click.option("--format", "fmt", type=click.Choice(["xml", "json"]), default="xml")
@click.option("--max-tokens", type=int, default=None, help="Budget (an upper-bound count): shorten, then drop.")
@click.option("--for", "request", default=None, help="Order entries by relevance to this request (skills search).")
def prompt(fmt: str, max_tokens: int | None, request: str | None) -> None:
    """The <available_skills> catalog an agent loads as context."""
    from skillbook import agent

    click.echo(agent.prompt(fmt=fmt, max_tokens=max_tokens, request=request))


@main.command()
@click.option("--check", is_flag=True, help="Fail if checked-in schemas differ from the models.")
def schema(check: bool) -> None:
    """Write schemas/ from the pydantic models (or check for drift)."""
    from skillbook.run import schemas

    if check:
        drift = schemas.check()
        for line in drift:
            click.echo(line, err=True)
        sys.exit(1 if drift else 0)
    for path in schemas.write():
        click.echo(f"wrote {path}")


@main.command("index")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def index_cmd(out: Path) -> None:
    """Write the catalog index as JSON."""
    click.echo(f"wrote {catalog.write_index(out)}")


@main.group("runs", invoke_without_command=True)
@click.option("--runs-dir", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def runs_cmd(ctx: click.Context, runs_dir: Path | None, as_json: bool) -> None:
    """List past pipeline and skill runs (`skills runs gc` prunes the step cache and failed runs)."""
    ctx.obj = runs_dir
    if ctx.invoked_subcommand:
        return
    from skillbook.run import pipeline

    items = pipeline.list_runs(runs_dir)
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    for item in items:
        click.echo(f"{item['kind']:<9} {item['name']:<20} {item['status']:<10} {item['path']}")


@runs_cmd.command("gc")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.pass_obj
def runs_gc(runs_dir: Path | None, dry_run: bool) -> None:
    """Remove step-cache entries the latest run of each pipeline does not use, and failed runs."""
    from skillbook.run import pipeline

    removed = pipeline.gc(runs_dir, dry_run=dry_run)
    for path in removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    click.echo(f"{len(removed)} director{'y' if len(removed) == 1 else 'ies'} {'to remove' if dry_run else 'removed'}")


def _register_extras() -> None:
    """Command groups that live in their own modules (each imports only click at start-up)."""
    from skillbook.cli import agent, quality
    from skillbook.cli.site import site

    main.add_command(site)
    for command in [*agent.COMMANDS, *quality.COMMANDS]:
        main.add_command(command)


_register_extras()

if __name__ == "__main__":
    main()
