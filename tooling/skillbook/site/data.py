"""What the docs site shows besides Markdown: config tables, run commands, tested-with, results, pipelines."""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path

import yaml

from skillbook.errors import SkillbookError

# ids the skill template gives its generated sections; Markdown headings get a suffix instead of these
SKILL_SECTION_IDS = ("run", "configuration", "presets", "references", "tested-with", "results")


# ---------------------------------------------------------------------------------------------
# Config table from a recipe's JSON Schema
# ---------------------------------------------------------------------------------------------


def load_config(skill_dir: Path, root: Path) -> tuple[dict | None, type | None]:
    """(JSON Schema, Config class) from the recipe; the checked-in schema alone if the recipe cannot load."""
    if not (skill_dir / "recipe.py").is_file():
        return None, None
    from skillbook.run import recipe

    try:
        model = recipe.load(skill_dir).Config
        return model.model_json_schema(), model
    except Exception:  # noqa: BLE001 - lint reports broken recipes; the site falls back to schemas/
        path = root / "schemas" / f"{skill_dir.name}.schema.json"
        return (json.loads(path.read_text()) if path.is_file() else None), None


def load_schema(skill_dir: Path, root: Path) -> dict | None:
    return load_config(skill_dir, root)[0]


def factory_defaults(model, prefix: str = "") -> dict[str, str]:
    """Defaults made by default_factory (lists, dicts), which JSON Schema leaves out, by dotted field name."""
    from pydantic import BaseModel

    out = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(factory_defaults(ann, f"{prefix}{name}."))
        elif info.default_factory is not None:
            try:
                out[f"{prefix}{name}"] = json.dumps(info.default_factory(), default=str)
            except Exception:  # noqa: BLE001 - a factory that needs arguments: leave the cell empty
                pass
    return out


def _deref(prop: dict, defs: dict) -> dict:
    ref = prop.get("$ref") or (prop.get("allOf", [{}])[0].get("$ref") if len(prop.get("allOf", [])) == 1 else None)
    if ref and ref.startswith("#/$defs/"):
        return {**defs.get(ref.split("/")[-1], {}), **{k: v for k, v in prop.items() if k not in ("$ref", "allOf")}}
    return prop


def type_text(prop: dict, defs: dict) -> str:
    """A short type: `integer`, `string | null`, `"adamw" | "sgd"`, `array of number`."""
    prop = _deref(prop, defs)
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return " | ".join(type_text(p, defs) for p in prop[key])
    kind = prop.get("type")
    if isinstance(kind, list):
        return " | ".join(kind)
    if kind == "array":
        return f"array of {type_text(prop['items'], defs)}" if isinstance(prop.get("items"), dict) else "array"
    if kind == "object" and "properties" not in prop and isinstance(prop.get("additionalProperties"), dict):
        return f"map of {type_text(prop['additionalProperties'], defs)}"
    return kind or prop.get("title", "any")


def constraints(prop: dict, defs: dict) -> str:
    """Bounds and patterns a value must meet, e.g. `≥ 1, ≤ 64`."""
    prop = _deref(prop, defs)
    subs = [p for key in ("anyOf", "oneOf") for p in prop.get(key, [])]
    found = []
    for p in [prop, *subs]:
        for key, sym in (
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("exclusiveMaximum", "<"),
            ("minLength", "length ≥"),
            ("maxLength", "length ≤"),
            ("minItems", "items ≥"),
            ("maxItems", "items ≤"),
            ("pattern", "matches"),
        ):
            if key in p:
                found.append(f"{sym} {p[key]}")
    return ", ".join(found)


def config_rows(schema: dict, prefix: str = "", defs: dict | None = None) -> list[dict]:
    """One row per field (nested models flattened to dotted names): field, type, default, description."""
    defs = schema.get("$defs", {}) if defs is None else defs
    required = set(schema.get("required", []))
    rows = []
    for name, raw in schema.get("properties", {}).items():
        prop = _deref(raw, defs)
        dotted = f"{prefix}{name}"
        nested = prop.get("type") == "object" and "properties" in prop
        default = (
            json.dumps(raw["default"])
            if "default" in raw
            else "required"
            if name in required
            else "see below"
            if nested
            else ""
        )
        rows.append(
            {
                "field": dotted,
                "type": type_text(raw, defs),
                "constraints": constraints(raw, defs),
                "default": default,
                "description": raw.get("description") or prop.get("description", ""),
            }
        )
        if nested:
            rows.extend(config_rows(prop, f"{dotted}.", defs))
    return rows


# ---------------------------------------------------------------------------------------------
# Facts for a skill page
# ---------------------------------------------------------------------------------------------


def tested_with(metadata: dict[str, str]) -> list[tuple[str, str]]:
    """(package, version) pairs from `tested-with*` metadata keys; `tested-with: torch==2.13 trl==1.16` works too."""
    pairs: list[tuple[str, str]] = []
    for key, value in metadata.items():
        if not key.startswith("tested-with"):
            continue
        items = [v for v in re.split(r"[\s,;]+", value.strip()) if v]
        if items and all(re.match(r"^[\w.\-\[\]]+(==|=|@)\S+$", v) for v in items):
            for v in items:  # the pattern above has a separator and maxsplit=1: always two parts
                package, version = re.split(r"==|=|@", v, maxsplit=1)
                pairs.append((package, version))
        else:
            pairs.append((key.removeprefix("tested-with").strip("-:.") or "versions", value))
    return pairs


def _numbers(data, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                out.append((f"{prefix}{k}", f"{v:.6g}" if isinstance(v, float) else str(v)))
            elif isinstance(v, dict) and depth < 1:
                out += _numbers(v, f"{prefix}{k}.", depth + 1)
    return out


def results(skill: str, root: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Latest figures: benchmarks/results/<skill>*.json, site/data/<skill>/, and the newest runs/<skill>/ run."""
    tables, plots = [], []
    bench = root / "benchmarks" / "results"
    data = root / "site" / "data" / skill
    candidates = sorted(bench.glob(f"{skill}*.json")) if bench.is_dir() else []
    candidates = [p for p in candidates if p.stem == skill or p.stem[len(skill)] in "-_."]
    candidates += sorted(data.glob("*.json")) if data.is_dir() else []
    runs = root / "runs" / skill
    latest = sorted(p for p in runs.glob("*/outputs.json")) if runs.is_dir() else []
    for path in candidates + latest[-1:]:
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if path.name == "outputs.json":
            loaded = loaded.get("summary", {}) if isinstance(loaded, dict) else {}
        rows = _numbers(loaded)
        if rows:
            what = "Latest local run" if path.name == "outputs.json" else "Benchmark"
            tables.append({"source": path.relative_to(root).as_posix(), "rows": rows, "what": what})
    pngs = (
        [p for p in sorted(bench.glob(f"{skill}*.png")) if p.stem == skill or p.stem[len(skill)] in "-_."]
        if bench.is_dir()
        else []
    )
    pngs += sorted(data.glob("*.png")) if data.is_dir() else []
    pngs += sorted(latest[-1].parent.glob("*.png")) if latest else []
    for p in pngs:
        plots.append((p, f"files/{p.relative_to(root).as_posix()}"))
    return tables, plots


def skill_facts(skill, root: Path, pipelines: dict) -> dict:
    """Everything the skill template shows beside the rendered SKILL.md."""
    schema, model = load_config(skill.path, root)
    rel = skill.path.relative_to(root).as_posix()
    sources = [f"{rel}/recipe.py"] if skill.has_recipe else []
    sources += [f"{rel}/recipe.yaml"] if (skill.path / "recipe.yaml").is_file() else []
    presets = []
    for name in skill.presets:
        path = skill.path / "configs" / f"{name}.yaml"
        text = path.read_text(encoding="utf-8")
        first = next(
            (ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#") and "$schema" not in ln), ""
        )
        presets.append({"name": name, "page": f"files/{rel}/configs/{name}.yaml.html", "note": first, "text": text})
        sources.append(f"{rel}/configs/{name}.yaml")
    tables, plots = results(skill.folder, root)
    rows = config_rows(schema) if schema else []
    made = factory_defaults(model) if model is not None else {}
    for row in rows:
        if not row["default"] and row["field"] in made:
            row["default"] = made[row["field"]]
    example = next(
        (r for r in rows if r["type"] in ("integer", "number") and r["default"] not in ("", "required")), None
    )
    used_by = [p for p, spec in pipelines.items() if any(s["skill"] == skill.folder for s in spec["steps"])]
    return {
        "rows": rows,
        "example": example,
        "has_schema": schema is not None,
        "presets": presets,
        "sources": sources,
        "recipe_page": f"files/{rel}/recipe.py.html" if skill.has_recipe else None,
        "yaml_page": f"files/{rel}/recipe.yaml.html" if (skill.path / "recipe.yaml").is_file() else None,
        "tested_with": tested_with(skill.metadata),
        "results": tables,
        "plots": [d for _, d in plots],
        "copies": plots,
        "used_by": used_by,
        "raw": f"skills/{skill.folder}/SKILL.md",
    }


def skill_toc(facts: dict) -> list[tuple[int, str, str]]:
    toc = [(2, "Run it", "run")]
    toc += [(2, "Configuration", "configuration")] if facts["has_schema"] else []
    toc += [(2, "Presets", "presets")] if facts["presets"] else []
    toc += [(2, "References", "references"), (2, "Tested with", "tested-with")]
    toc += [(2, "Latest results", "results")] if facts["results"] or facts["plots"] else []
    return toc


def first_paragraph(text: str) -> str:
    """The first prose paragraph of a Markdown file (headings and code skipped), for summaries."""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if para and not para.startswith(("#", "```", "|", "<", "---")):
            return re.sub(r"\s+", " ", re.sub(r"[*_`]|\[([^\]]*)\]\([^)]*\)", r"\1", para))[:300]
    return ""


def entry(kind: str, name: str, title: str, description: str, url: str, toc: list, stage: str) -> dict:
    """One search-index record: what the search box matches on and where a hit links to."""
    return {
        "kind": kind,
        "name": name,
        "title": title or name,
        "description": description,
        "url": url,
        "stage": stage,
        "headings": [[text, f"{url}#{hid}"] for _, text, hid in toc],
    }


def source_lines(text: str, lang: str, highlight) -> str:
    """A highlighted file with an `L<n>` anchor on every line (links like recipe.py#L12 resolve)."""
    lang = {"py": "python", "yml": "yaml", "md": "markdown", "sh": "bash"}.get(lang, lang)
    lines = highlight(text, lang).split("\n")
    if lines and not lines[-1]:
        lines.pop()
    return "".join(
        f'<span class="line" id="L{i}"><a class="ln" href="#L{i}">{i}</a>{line}\n</span>'
        for i, line in enumerate(lines, 1)
    )


def agent_catalog(root: Path) -> dict[str, str]:
    """`<available_skills>` XML and JSON with locations relative to a checkout (not this machine's paths)."""
    from skillbook import agent

    prefix = str(root) + "/"
    return {
        name: agent.prompt(fmt=fmt, root=root).replace(prefix, "").replace(escape(prefix), "") + "\n"
        for name, fmt in (("available_skills.xml", "xml"), ("available_skills.json", "json"))
    }


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def load_pipelines(root: Path) -> dict[str, dict]:
    """recipes/*.yaml validated as PipelineSpec; each step also gets the line it starts on."""
    from pydantic import ValidationError

    from skillbook import catalog
    from skillbook.run.pipeline import PipelineSpec

    out = {}
    for path in catalog.pipeline_files(root):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        try:
            spec = PipelineSpec.model_validate(yaml.safe_load(text)).model_dump(mode="json")
        except (yaml.YAMLError, ValidationError) as exc:
            raise SkillbookError(
                f"{rel}: not a valid pipeline ({str(exc).splitlines()[0]}); run `skills lint`"
            ) from None
        for step in spec["steps"]:
            m = re.search(rf"^\s*-?\s*id:\s*['\"]?{re.escape(step['id'])}['\"]?\s*$", text, re.M)
            step["line"] = text[: m.start()].count("\n") + 1 if m else 0
            step["config_yaml"] = yaml.safe_dump(step["config"], sort_keys=False).strip() if step["config"] else ""
        out[path.stem] = spec
    return out
