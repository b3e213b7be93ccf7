"""The recipe contract: `Config(RecipeConfig)`, `OUTPUTS`, `run(cfg, ctx)`, and config resolution.

Resolution order (later wins): field defaults < recipe.yaml < --preset NAME < --config FILE
< --set key.sub=value. Every error is collected and reported at once, naming the field and,
for unknown keys, the closest known one. Nothing touches disk before validation succeeds.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from skillbook.errors import ConfigError, SkillbookError
from skillbook.run.code_scan import ml_imports, skill_calls
from skillbook.run.tracking import Tracking

ARTIFACT_KINDS = (
    "corpus",
    "tokenizer",
    "hf-model",
    "adapter",
    "sft-data",
    "preference-data",
    "gguf",
    "onnx",
    "eval-report",
    "report",
    "dir",
    "file",
)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def safe_name(value: str) -> str:
    """A file-name stem a recipe writes inside its run dir: no separators, no `..`, no leading dot."""
    if len(value) > 200 or ".." in value or not _SAFE_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a safe file name: use letters, digits and . _ + - only "
            "(no '/', '\\' or '..'; it names a file inside the run dir)"
        )
    return value


SafeName = Annotated[str, AfterValidator(safe_name)]


class RecipeConfig(BaseModel):
    """Base of every recipe's Config: unknown keys are errors, assignments are validated. Every recipe has
    `tracking`: where its ctx.log metrics are mirrored (TensorBoard, MLflow; skillbook.run.tracking)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    tracking: Tracking = Field(
        Tracking(),
        description="Mirror the run's metrics to TensorBoard (<run>/tensorboard) and/or MLflow, e.g. "
        "{tensorboard: true, mlflow: true}.",
    )


@dataclass
class Recipe:
    """A loaded recipe module and the facts the runner and pipeline need."""

    name: str
    path: Path
    Config: type[RecipeConfig]
    OUTPUTS: dict[str, str]
    INPUTS: dict[str, str]
    run: Callable[..., dict]

    @property
    def skill_dir(self) -> Path:
        return self.path.parent

    def presets(self) -> list[str]:
        cfg = self.skill_dir / "configs"
        return sorted(p.stem for p in cfg.glob("*.yaml")) if cfg.is_dir() else []

    def source_text(self) -> str:
        return self.path.read_text()

    def code_text(self) -> str:
        """The pipeline cache key's code: recipe.py, every skill it runs through `ctx.run_skill("name")`
        (its recipe.py and recipe.yaml, transitively), and every `skillbook.ml` module or package they
        import, transitively. A change to a shared helper such as the synthetic data generator, or to
        the tokenizer recipe that pretraining runs inside itself, must rerun the steps using it."""
        skills = {self.name: self.source_text()}
        ml_dir = Path(__file__).parents[1] / "ml"
        found: dict[str, str] = {}
        calls, first = skill_calls(self.source_text()), True
        while calls or first:  # skills run by the recipe or an ml helper it imports (ml.subruns), transitively
            todo, calls, first = set(calls), set(), False
            while todo:
                name = todo.pop()
                path = self.skill_dir.parent / name / "recipe.py"
                if name in skills or not path.is_file():
                    continue
                skills[name] = path.read_text()
                todo |= skill_calls(skills[name])
            modules = set().union(*(ml_imports(text, in_ml=False) for text in skills.values()))
            while modules:
                name = modules.pop()
                if name in found:
                    continue
                files = [ml_dir / f"{name}.py", *sorted((ml_dir / name).glob("*.py"))]  # a module, or a package
                text = "\n".join(f.read_text() for f in files if f.is_file())
                if text:
                    found[name] = text
                    modules |= ml_imports(text, in_ml=True)
                    calls |= skill_calls(text) - set(skills)
        called = sorted(set(skills) - {self.name})
        yamls = [self.skill_dir.parent / n / "recipe.yaml" for n in called]
        # sorted: set order varies with PYTHONHASHSEED, and the key must not
        return "\n".join(
            [self.source_text()]
            + [skills[n] for n in called]
            + [y.read_text() for y in yamls if y.is_file()]
            + [found[name] for name in sorted(found)]
        )


def import_module(path: Path, name: str) -> ModuleType:
    """Import a recipe file under a private module name (recipe.py files share a name)."""
    mod_name = f"skillbook_recipes.{name.replace('-', '_')}"
    if mod_name in sys.modules and getattr(sys.modules[mod_name], "__file__", None) == str(path):
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise SkillbookError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(mod_name, None)
        raise
    return module


def load(skill_dir: Path) -> Recipe:
    """Load `skill_dir/recipe.py` and check it honours the contract."""
    path = skill_dir / "recipe.py"
    if not path.is_file():
        raise SkillbookError(f"skill '{skill_dir.name}' has no recipe.py; it is knowledge only and cannot be run")
    module = import_module(path, skill_dir.name)
    missing = [n for n in ("Config", "OUTPUTS", "run") if not hasattr(module, n)]
    if missing:
        raise SkillbookError(f"{path}: the recipe contract needs {', '.join(missing)}")
    if not (isinstance(module.Config, type) and issubclass(module.Config, RecipeConfig)):
        raise SkillbookError(f"{path}: Config must subclass skillbook.run.recipe.RecipeConfig")
    return Recipe(
        skill_dir.name, path, module.Config, dict(module.OUTPUTS), dict(getattr(module, "INPUTS", {})), module.run
    )


# ---------------------------------------------------------------------------------------------
# Config resolution
# ---------------------------------------------------------------------------------------------


def read_yaml(path: Path, what: str) -> dict:
    """Read a YAML mapping, turning every problem into a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of field: value")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_SCI_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_set(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], typed value); the value is read as YAML (1 -> int, true -> bool)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 3e-4 as a string; numbers in scientific notation are common for learning rates.
    if isinstance(value, str) and _SCI_NUMBER.match(value.strip()):
        value = float(value)
    return key.split("."), value


def apply_sets(data: dict, sets: list[str]) -> dict:
    data = dict(data)
    for item in sets:
        path, value = parse_set(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[path[-1]] = value
    return data


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that `loc` points into, for did-you-mean."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    """One message listing every bad field with its fix."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "(root)"
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc), n=1, cutoff=0.6)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), near[0]])}'?" if near else ""
            lines.append(f"  {dotted}: unknown field{hint}")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) and len(repr(got)) < 80 else ""
            lines.append(f"  {dotted}: {err['msg']}{shown}")
    return f"invalid config for {where}:\n" + "\n".join(lines)


def validate(config_cls: type[RecipeConfig], data: dict, where: str) -> RecipeConfig:
    try:
        return config_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation(exc, config_cls, where)) from None


def layered_data(
    recipe: Recipe,
    preset: str | None = None,
    config_file: Path | None = None,
    sets: list[str] | None = None,
    overrides: dict | None = None,
) -> dict:
    """Merge recipe.yaml, preset, config file, `overrides` and --set values (defaults come from Config)."""
    data: dict = {}
    default = recipe.skill_dir / "recipe.yaml"
    if default.is_file():
        data = read_yaml(default, "default config")
    if preset:
        path = recipe.skill_dir / "configs" / f"{preset}.yaml"
        if not path.is_file():
            names = recipe.presets()
            near = difflib.get_close_matches(preset, names, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"available: {', '.join(names) or 'none'}"
            raise ConfigError(f"--preset {preset!r}: skill '{recipe.name}' has no such preset; {hint}")
        data = deep_merge(data, read_yaml(path, f"preset {preset!r}"))
    if config_file:
        data = deep_merge(data, read_yaml(Path(config_file), "--config file"))
    if overrides:
        data = deep_merge(data, overrides)
    return apply_sets(data, sets or [])


def resolve(
    recipe: Recipe,
    preset: str | None = None,
    config_file: Path | None = None,
    sets: list[str] | None = None,
    overrides: dict | None = None,
) -> RecipeConfig:
    """The validated Config for a run; raises ConfigError listing every problem."""
    data = layered_data(recipe, preset, config_file, sets, overrides)
    return validate(recipe.Config, data, f"skill '{recipe.name}'")


def dump(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def artifact_path(ref: str | Path, what: str) -> Path:
    """A local artifact path that must exist; raises ConfigError naming the field otherwise."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{what}: {path} does not exist; pass a path produced by an earlier run "
            f"(see its outputs.json) or omit it to use the embedded default"
        )
    return path


HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_KINDS = ("hf-model", "adapter", "tokenizer")  # inputs that may also name a hub repository


def check_inputs(recipe: Recipe, cfg: RecipeConfig) -> None:
    """Refuse missing input artifacts before a run directory exists (one message for all of them).

    A local path must exist. A hub id (`org/name`) is accepted for model-like inputs unless the
    hub is off (HF_HUB_OFFLINE=1) and the id is not in the local cache.
    """
    import os

    problems = []
    for field, kind in recipe.INPUTS.items():
        value = getattr(cfg, field, None)
        if not isinstance(value, str) or not value or "${" in value:
            continue
        if Path(value).expanduser().exists():
            if {"hf-model", "gguf"} & set(kind.split("|")):
                from skillbook.ml.model_files import input_problems

                problems += input_problems(value, field)
            continue
        looks_hub = (
            bool(set(kind.split("|")) & set(HUB_KINDS))
            and HUB_ID_RE.match(value)
            and not value.startswith((".", "/", "~"))
        )
        if looks_hub and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
            continue
        if looks_hub:
            problems.append(
                f"  {field}: {value!r} is not a local path and the hub is offline (HF_HUB_OFFLINE=1); "
                f"pass a {kind} directory produced by an earlier run"
            )
        else:
            problems.append(
                f"  {field}: {value} does not exist; pass a {kind} produced by an earlier run (see its outputs.json)"
            )
    if problems:
        raise ConfigError(f"invalid inputs for skill '{recipe.name}':\n" + "\n".join(problems))
