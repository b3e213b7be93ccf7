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
def install(names, all_skills, to, agent, link, force, as_json) -> None:
    """Copy (or link) skills into an agent's skills directory."""
    from skillbook import agent as agent_mod

    target = to or Path(AGENT_DIRS[agent or "agents"])
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


COMMANDS: list[click.Command] = [install, marketplace_cmd]
