"""`skills site build|serve`: the static docs site (see skillbook.site)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def site() -> None:
    """Build or serve the static docs site."""


@site.command()
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Output folder (default build/site in the repository)."
)
@click.option("--json", "as_json", is_flag=True, help="Print pages, counts and the build time as JSON.")
def build(out: Path | None, as_json: bool) -> None:
    """Render every skill, reference and pipeline to static HTML; broken links fail the build."""
    import json

    from skillbook.site import build as site_mod

    result = site_mod.build(out)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(
            f"built {result['pages']} pages ({result['skills']} skills, {result['pipelines']} pipelines) "
            f"in {result['seconds']:.2f} s: {result['out']}/index.html"
        )


@site.command()
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Site folder (default build/site in the repository)."
)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--build/--no-build", "rebuild", default=True, show_default=True, help="Build the site before serving it."
)
def serve(out: Path | None, port: int, rebuild: bool) -> None:
    """Serve the site on http://127.0.0.1:PORT for a look (Ctrl-C stops)."""
    from skillbook import catalog
    from skillbook.errors import SkillbookError
    from skillbook.site import build as site_mod

    folder = Path(out or catalog.repo_root() / "build" / "site").resolve()
    if rebuild:
        result = site_mod.build(folder)
        click.echo(f"built {result['pages']} pages in {result['seconds']:.2f} s", err=True)
    elif not (folder / "index.html").is_file():
        raise SkillbookError(f"{folder} has no index.html; run `skills site build` first or drop --no-build")
    click.echo(f"serving {folder} on http://127.0.0.1:{port}/ (Ctrl-C stops)", err=True)
    try:
        site_mod.serve(folder, port=port)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise SkillbookError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}; pick another --port") from None
