"""JSON Schemas generated from the pydantic models, checked in under schemas/."""

from __future__ import annotations

import json
from pathlib import Path

from skillbook import catalog
from skillbook.run import recipe as recipe_mod


def generated(root: Path | None = None) -> dict[str, dict]:
    """File name -> schema for every recipe Config, plus the pipeline file format."""
    from skillbook.run.pipeline import PipelineSpec

    root = root or catalog.repo_root()
    out: dict[str, dict] = {"pipeline.schema.json": PipelineSpec.model_json_schema()}
    for path in catalog.skill_dirs(root):
        if (path / "recipe.py").is_file():
            rec = recipe_mod.load(path)
            schema = rec.Config.model_json_schema()
            schema["title"] = f"{rec.name} recipe config"
            out[f"{rec.name}.schema.json"] = schema
    return out


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(root: Path | None = None) -> list[Path]:
    root = root or catalog.repo_root()
    target = root / "schemas"
    target.mkdir(exist_ok=True)
    written = []
    for name, schema in generated(root).items():
        path = target / name
        path.write_text(render(schema))
        written.append(path)
    for stale in set(target.glob("*.schema.json")) - set(written):
        stale.unlink()
    return written


def check(root: Path | None = None) -> list[str]:
    """Drift messages: schemas missing, different, or left over (empty when in sync)."""
    root = root or catalog.repo_root()
    target = root / "schemas"
    expected = generated(root)
    problems = []
    for name, schema in expected.items():
        path = target / name
        if not path.is_file():
            problems.append(f"schemas/{name} is missing; run `skills schema`")
        elif path.read_text() != render(schema):
            problems.append(f"schemas/{name} differs from the model; run `skills schema`")
    for path in sorted(target.glob("*.schema.json")) if target.is_dir() else []:
        if path.name not in expected:
            problems.append(f"schemas/{path.name} has no model any more; run `skills schema`")
    return problems
