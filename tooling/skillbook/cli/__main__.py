"""`python -m skillbook.cli`: the `skills` command."""

from skillbook.cli import main

main()
