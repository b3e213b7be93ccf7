"""`skills install` and `skills doctor`: agent integration and tested-with checks."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
