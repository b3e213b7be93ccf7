"""Entry point for each torchrun process: `python -m skillbook.run.worker RUN_DIR SKILL_DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

from skillbook.run import recipe as recipe_mod
from skillbook.run import runner


def main(argv: list[str] | None = None) -> int:
    run_dir, skill_dir = (Path(a) for a in (argv or sys.argv[1:]))
    recipe = recipe_mod.load(skill_dir)
    cfg = recipe_mod.validate(recipe.Config, recipe_mod.read_yaml(run_dir / "config.yaml", "run config"), recipe.name)
    runner.execute(recipe, cfg, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
