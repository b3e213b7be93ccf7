"""`skills install` and `skills marketplace`: putting skills where agents load them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from skillbook.agent import AGENT_DIRS  # light: json + the catalog, no ML libraries


@click.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_skills", is_flag=True, help="Install every skill in the catalog.")
@click.option(
    "--router",
    is_flag=True,
    help="Install only the 'skillbook' router skill: one small entry that finds the others with `skills search`.",
)
@click.option(
    "--to",
    "to",
    type=click.Path(path_type=Path),
    default=None,
    help="The agent's skills directory (default .agents/skills, or the one --agent names).",
)
@click.option(
    "--agent",
    type=click.Choice(sorted(AGENT_DIRS)),
    default=None,
    help="Shortcut for --to: " + ", ".join(f"{k}={v}" for k, v in sorted(AGENT_DIRS.items())) + ".",
)
@click.option(
    "--link", is_flag=True, help="Symlink the skill folders instead of copying (edits flow back to the checkout)."
)
@click.option("--force", is_flag=True, help="Overwrite files you changed since the last install.")
@click.option("--json", "as_json", is_flag=True)
def install(names, all_skills, router, to, agent, link, force, as_json) -> None:
    """Copy (or link) skills into an agent's skills directory."""
    from skillbook import agent as agent_mod
    from skillbook.catalog.search import ROUTER
    from skillbook.errors import SkillbookError

    if router and (names or all_skills):
        raise SkillbookError("--router installs the router alone; drop the skill names and --all")
    target = to or Path(AGENT_DIRS[agent or "agents"])
    names = (ROUTER,) if router else names
    results = agent_mod.install(list(names), target, all_skills=all_skills, link=link, force=force)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(f"{r['action']:<10} {r['skill']:<24} {r['path']}")
    click.echo(f"{len(results)} skill(s) in {target}", err=True)


@click.command("marketplace")
@click.option("--check", is_flag=True, help="Fail if .claude-plugin/marketplace.json differs from the catalog.")
def marketplace_cmd(check: bool) -> None:
    """Write .claude-plugin/marketplace.json (a Claude Code plugin marketplace) from the catalog."""
    from skillbook import agent

    if check:
        drift = agent.marketplace_drift()
        for line in drift:
            click.echo(line, err=True)
        sys.exit(1 if drift else 0)
    click.echo(f"wrote {agent.write_marketplace()}")


@click.command("search")
@click.argument("query", nargs=-1, required=True)
@click.option("-k", "k", type=click.IntRange(1, 100), default=5, show_default=True, help="How many answers to show.")
@click.option("--json", "as_json", is_flag=True, help="The ranking as JSON on stdout.")
def search_cmd(query: tuple[str, ...], k: int, as_json: bool) -> None:
    """Rank skills and pipelines for a request in plain words (BM25 over names, descriptions, example requests)."""
    from skillbook.catalog import search as search_mod  # imports bm25s: numpy + scipy, never torch

    result = search_mod.search(" ".join(query), k=k)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    if result.no_skill:
        best = (
            f"best score {result.hits[0].score:.2f}, coverage {result.hits[0].coverage:.2f}; needs "
            f">= {result.threshold:.2f} and >= {result.min_coverage:.2f}"
            if result.hits
            else "no word matched"
        )
        click.echo(f"no skill: nothing in the library serves this request ({best})")
    for h in result.hits:
        click.echo(f"{h.rank:>2}. {h.name:<24} {h.kind:<8} {h.score:6.2f} {h.coverage:5.2f}  {', '.join(h.matched)}")
    if result.hits and not result.no_skill:
        top = result.hits[0]
        nxt = f"skills show {top.name}" if top.kind == "skill" else f"skills run {top.name} --dry-run"
        click.echo(f"next: {nxt}", err=True)


COMMANDS: list[click.Command] = [install, marketplace_cmd, search_cmd]
