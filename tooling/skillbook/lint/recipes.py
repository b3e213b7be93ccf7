"""Recipe rules (SB301-SB305): the recipe contract, its default config and presets, light imports, overrides only."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from skillbook.catalog import Skill
from skillbook.lint.findings import Finding, err
from skillbook.run import recipe as recipe_mod

HEAVY_MODULES = {
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "tokenizers",
    "sentencepiece",
    "llama_cpp",
    "vllm",
    "onnxruntime",
    "gguf",
    "numpy",
    "matplotlib",
}


def rule_recipe(skill: Skill) -> Iterator[Finding]:
    """SB301-SB304: recipe contract, default config, presets, light imports."""
    path = skill.path / "recipe.py"
    if not path.is_file():
        return
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError as exc:
        yield err("SB301", path, exc.lineno or 0, f"recipe.py does not parse: {exc.msg}")
        return
    for node in tree.body:  # module-level imports only: run() imports the heavy libraries lazily
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        for name in names:
            if name.split(".")[0] in HEAVY_MODULES:
                yield err(
                    "SB304",
                    path,
                    node.lineno,
                    f"module-level import of '{name}': import it inside run() so `skills list/lint` stay fast",
                )
    try:
        rec = recipe_mod.load(skill.path)
    except Exception as exc:  # noqa: BLE001 - any import failure is a finding
        yield err("SB301", path, 0, f"recipe.py cannot be loaded: {exc}")
        return
    declared = [(k, kind) for k, v in {**rec.OUTPUTS, **rec.INPUTS}.items() for kind in str(v).split("|")]
    bad_kinds = {k: kind for k, kind in declared if kind not in recipe_mod.ARTIFACT_KINDS}
    if bad_kinds:
        yield err(
            "SB301", path, 0, f"unknown artifact kinds {bad_kinds}; known: {', '.join(recipe_mod.ARTIFACT_KINDS)}"
        )
    default = skill.path / "recipe.yaml"
    if not default.is_file():
        yield err("SB302", default, 0, "recipe.yaml (the CPU-tiny default config) is missing")
    else:
        first = default.read_text().split("\n", 1)[0]
        if f"schemas/{rec.name}.schema.json" not in first:
            yield err(
                "SB302",
                default,
                1,
                "first line must point at its schema: "
                f"'# yaml-language-server: $schema=../../schemas/{rec.name}.schema.json'",
            )
    # Artifact inputs with no default (e.g. `model`) come from the command line or a pipeline step.
    required_inputs = {
        k: "/placeholder" for k, f in rec.Config.model_fields.items() if k in rec.INPUTS and f.is_required()
    }
    for preset in [None, *rec.presets()]:
        try:
            data = recipe_mod.layered_data(rec, preset=preset)
            recipe_mod.validate(rec.Config, {**required_inputs, **data}, f"skill '{rec.name}'")
        except Exception as exc:  # noqa: BLE001
            where = skill.path / "configs" / f"{preset}.yaml" if preset else default
            yield err("SB303", where, 0, str(exc).replace("\n", " "))


def _key_line(path: Path, key: str) -> int:
    """The line of a top-level `key:` in a YAML file (0 when not found)."""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if re.match(rf"^{re.escape(key)}\s*:", line):
            return i
    return 0


def rule_overrides_only(skill: Skill) -> Iterator[Finding]:
    """SB305: recipe.yaml and presets hold only overrides: a key equal to its field default is a second
    source of the same default, and the two drift apart (the code default stops being the one that runs)."""
    if not (skill.path / "recipe.py").is_file():
        return
    try:
        rec = recipe_mod.load(skill.path)
    except Exception:  # noqa: BLE001 - rule_recipe reports a recipe that does not load
        return
    fields = rec.Config.model_fields
    required: dict[str, Any] = {k: "/placeholder" for k, f in fields.items() if f.is_required()}
    try:
        default = rec.Config(**required).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - rule_recipe reports configs that do not validate
        return
    default_yaml = skill.path / "recipe.yaml"
    base = recipe_mod.read_yaml(default_yaml, "default config") if default_yaml.is_file() else {}
    files: list[tuple[Path, dict, dict]] = [(default_yaml, base, {})] if default_yaml.is_file() else []
    files += [(p, recipe_mod.read_yaml(p, "preset"), base) for p in sorted((skill.path / "configs").glob("*.yaml"))]
    for path, data, below in files:
        for key, value in data.items():
            if key not in fields or key in required or key in below:
                continue  # unknown keys are SB303's; a preset may restore a default recipe.yaml changed
            try:
                got = rec.Config(**{**required, key: value}).model_dump(mode="json")[key]
            except Exception:  # noqa: BLE001 - invalid values are SB303's
                continue
            if got == default[key]:
                yield err(
                    "SB305",
                    path,
                    _key_line(path, key),
                    f"'{key}: {value}' repeats the field default; delete it (a default lives in Config alone)",
                )
