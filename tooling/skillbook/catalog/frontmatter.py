"""SKILL.md frontmatter: split, parse and check against the Agent Skills spec.

Every check returns findings instead of raising, so malformed input (broken YAML,
binary junk, huge frontmatter) becomes a lint message, never a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

ALLOWED_KEYS = ("name", "description", "license", "compatibility", "metadata", "allowed-tools")
NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
MAX_NAME, MAX_DESCRIPTION, MAX_COMPATIBILITY = 64, 1024, 500
MAX_FRONTMATTER_CHARS = 64_000  # far above any real skill; bigger input is refused unparsed


@dataclass
class Problem:
    """One spec violation, with a 1-based line in SKILL.md (0 = whole file)."""

    code: str
    message: str
    line: int = 1


@dataclass
class Frontmatter:
    """Parsed frontmatter plus where the body starts."""

    data: dict = field(default_factory=dict)
    body: str = ""
    body_line: int = 1  # 1-based line of the first body line in SKILL.md
    problems: list[Problem] = field(default_factory=list)


def split(text: str) -> tuple[str | None, str, int]:
    """Return (frontmatter text or None, body, body's first line number)."""
    lines = text.split("\n")
    if not lines or lines[0].strip() != "---":
        return None, text, 1
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :]), i + 2
    return None, text, 1


def _flow_style_line(raw: str) -> int | None:
    """Line (1-based, inside the frontmatter) of the first flow collection, if any."""
    try:
        for token in yaml.scan(raw):
            if isinstance(token, (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken)):
                return token.start_mark.line + 1
    except yaml.YAMLError:
        return None
    return None


def parse(text: str) -> Frontmatter:
    """Parse SKILL.md text into frontmatter data and body, collecting spec problems."""
    fm = Frontmatter()
    raw, fm.body, fm.body_line = split(text)
    if raw is None:
        fm.problems.append(Problem("SB101", "SKILL.md must start with a '---' frontmatter block closed by '---'", 1))
        return fm
    if len(raw) > MAX_FRONTMATTER_CHARS:
        fm.problems.append(
            Problem("SB101", f"frontmatter is {len(raw)} characters; keep it under {MAX_FRONTMATTER_CHARS}", 1)
        )
        return fm
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 2 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        fm.problems.append(
            Problem("SB102", f"frontmatter is not valid YAML: {problem} (quote values that contain ': ')", line)
        )
        return fm
    if not isinstance(data, dict):
        fm.problems.append(Problem("SB102", "frontmatter must be a YAML mapping of keys to values", 2))
        return fm
    fm.data = data
    flow = _flow_style_line(raw)
    if flow is not None:
        fm.problems.append(
            Problem("SB103", "use block-style YAML: flow collections like [a, b] or {a: b} are not allowed", flow + 1)
        )
    fm.problems.extend(check(data, _key_lines(raw)))
    return fm


def _key_lines(raw: str) -> dict[str, int]:
    """Map top-level keys to their SKILL.md line numbers for precise messages."""
    out: dict[str, int] = {}
    for i, line in enumerate(raw.split("\n")):
        m = re.match(r"^([A-Za-z0-9_-]+)\s*:", line)
        if m:
            out.setdefault(m.group(1), i + 2)
    return out


def check(data: dict, lines: dict[str, int] | None = None, folder: str | None = None) -> list[Problem]:
    """Spec rules on parsed frontmatter; `folder` adds the name == folder rule."""
    lines = lines or {}
    at = lambda key: lines.get(key, 2)  # noqa: E731
    problems: list[Problem] = []
    for key in data:
        if str(key) not in ALLOWED_KEYS:
            problems.append(
                Problem(
                    "SB104",
                    f"unknown top-level key '{key}': allowed are {', '.join(ALLOWED_KEYS)}; "
                    "put extra keys under 'metadata'",
                    at(str(key)),
                )
            )
    name = data.get("name")
    if not isinstance(name, str) or not name:
        problems.append(Problem("SB105", "'name' is required: 1-64 lowercase letters, digits and hyphens", at("name")))
    else:
        if len(name) > MAX_NAME:
            problems.append(Problem("SB105", f"'name' is {len(name)} characters; the limit is {MAX_NAME}", at("name")))
        if not NAME_RE.match(name):
            problems.append(
                Problem(
                    "SB105",
                    f"'name' {name!r} must be lowercase letters, digits and single hyphens, "
                    "not starting or ending with '-'",
                    at("name"),
                )
            )
        if folder is not None and name != folder:
            problems.append(Problem("SB106", f"'name' {name!r} must equal the folder name {folder!r}", at("name")))
    desc = data.get("description")
    if not isinstance(desc, str) or not desc.strip():
        problems.append(
            Problem("SB107", "'description' is required: say what the skill does and when to use it", at("description"))
        )
    elif len(desc) > MAX_DESCRIPTION:
        problems.append(
            Problem(
                "SB107", f"'description' is {len(desc)} characters; the limit is {MAX_DESCRIPTION}", at("description")
            )
        )
    if "license" in data and not isinstance(data["license"], str):
        problems.append(Problem("SB108", "'license' must be a string", at("license")))
    comp = data.get("compatibility")
    if "compatibility" in data and (not isinstance(comp, str) or not 1 <= len(comp) <= MAX_COMPATIBILITY):
        problems.append(
            Problem(
                "SB108", f"'compatibility' must be a string of 1-{MAX_COMPATIBILITY} characters", at("compatibility")
            )
        )
    meta = data.get("metadata")
    if "metadata" in data:
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            problems.append(
                Problem("SB109", "'metadata' must map strings to strings (quote numbers and dates)", at("metadata"))
            )
    if "allowed-tools" in data and not isinstance(data["allowed-tools"], str):
        problems.append(Problem("SB108", "'allowed-tools' must be a space-separated string", at("allowed-tools")))
    return problems
