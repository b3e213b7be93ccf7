"""`skills site build|serve`: the static docs site (see skillbook.site)."""

from __future__ import annotations

import click


@click.group()
def site() -> None:
    """Build or serve the static docs site."""
