"""Tested-with versions: what each skill last passed with, compared with what is installed.

A skill records them in its SKILL.md frontmatter as one spec-valid metadata string:

    metadata:
      tested-with: "torch==2.13.0 transformers==5.23.0 trl==1.16.0"

`skills doctor` lists skills whose recorded versions differ from the installed ones;
`skills doctor --update NAME` rewrites only that one line after the skill's examples pass.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata

from skillbook.catalog import codeblocks, frontmatter
from skillbook.catalog.skills import Skill
from skillbook.errors import SkillbookError

KEY = "tested-with"
# Import name -> distribution name, for the libraries worth recording.
TRACKED = {
    "torch": "torch",
    "transformers": "transformers",
    "trl": "trl",
    "peft": "peft",
    "tokenizers": "tokenizers",
    "sentencepiece": "sentencepiece",
    "datasets": "datasets",
    "accelerate": "accelerate",
    "gguf": "gguf",
    "llama_cpp": "llama-cpp-python",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "vllm": "vllm",
    "bitsandbytes": "bitsandbytes",
    "safetensors": "safetensors",
    "lm_eval": "lm-eval",
    "fastapi": "fastapi",
    "openai": "openai",
    "datasketch": "datasketch",
}
_SPEC_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s=]+)$")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 normalises it (lm_eval, LM.Eval -> lm-eval): one spelling per package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(spec: str) -> dict[str, str]:
    """'torch==2.13.0 trl==1.16.0' -> {'torch': '2.13.0', 'trl': '1.16.0'}; bad items raise."""
    out = {}
    for item in spec.split():
        m = _SPEC_RE.match(item)
        if not m:
            raise SkillbookError(f"tested-with item {item!r} is not NAME==VERSION (e.g. 'torch==2.13.0')")
        out[canonical(m.group(1))] = m.group(2)
    return out


def render(versions: dict[str, str]) -> str:
    return " ".join(f"{name}=={ver}" for name, ver in sorted(versions.items()))


def installed(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def same(recorded: str, current: str) -> bool:
    """Equal releases; a local label ('+cpu', '+cu124') is a build detail, not another version."""
    return recorded.split("+")[0] == current.split("+")[0]


@dataclass
class Status:
    """One skill's tested-with record against the installed packages."""

    skill: str
    recorded: dict[str, str] = field(default_factory=dict)
    current: dict[str, str | None] = field(default_factory=dict)
    error: str | None = None

    @property
    def stale(self) -> dict[str, tuple[str, str]]:
        """Packages whose installed version differs: name -> (recorded, installed)."""
        return {
            n: (v, now)
            for n, v in self.recorded.items()
            if (now := self.current.get(n)) is not None and not same(v, now)
        }

    @property
    def missing(self) -> list[str]:
        """Recorded packages not installed here (e.g. vllm on a CPU box): reported, not stale."""
        return sorted(n for n in self.recorded if self.current.get(n) is None)

    @property
    def state(self) -> str:
        if self.error:
            return "invalid"
        if not self.recorded:
            return "untested"
        return "stale" if self.stale else "ok"

    def describe(self) -> str:
        if self.error:
            return self.error
        if not self.recorded:
            return f"no '{KEY}' in metadata: run `skills doctor --update {self.skill}`"
        parts = [f"{n} {old} -> {new}" for n, (old, new) in sorted(self.stale.items())]
        parts += [f"{n} not installed" for n in self.missing]
        return ", ".join(parts) if parts else render(self.recorded)

    def as_dict(self) -> dict:
        return {
            "skill": self.skill,
            "state": self.state,
            "recorded": self.recorded,
            "installed": self.current,
            "stale": {n: {"tested": a, "installed": b} for n, (a, b) in self.stale.items()},
            "missing": self.missing,
            "error": self.error,
        }


def recorded(skill: Skill) -> dict[str, str]:
    """The skill's tested-with versions ({} when none or malformed) — what the site shows."""
    try:
        return parse(skill.metadata.get(KEY, ""))
    except SkillbookError:
        return {}


def check(skill: Skill) -> Status:
    status = Status(skill.name)
    try:
        status.recorded = parse(skill.metadata.get(KEY, ""))
    except SkillbookError as exc:
        status.error = str(exc)
        return status
    status.current = {n: installed(n) for n in status.recorded}
    return status


# ---------------------------------------------------------------------------------------------
# Which packages a skill uses, and rewriting the one frontmatter line
# ---------------------------------------------------------------------------------------------


def _imports(code: str) -> set[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def used_packages(skill: Skill) -> list[str]:
    """Tracked libraries imported by the recipe and the skill's Python blocks (torch if any ML lib)."""
    code = [ex.block.code for ex in codeblocks.collect(skill) if ex.kind == "python"]
    recipe = skill.path / "recipe.py"
    if recipe.is_file():
        code.append(recipe.read_text())
    mods = set().union(*(_imports(c) for c in code)) if code else set()
    dists = {TRACKED[m] for m in mods if m in TRACKED}
    if dists & {"transformers", "trl", "peft", "accelerate"}:
        dists.add("torch")
    return sorted(dists)


def current_spec(packages: list[str]) -> dict[str, str]:
    """Installed versions of `packages` (those not installed are left out)."""
    return {p: v for p in packages if (v := installed(p)) is not None}


def set_tested_with(text: str, spec: str) -> str:
    """Rewrite (or add) the `tested-with` line in the metadata block; every other byte stays."""
    raw, _, body_line = frontmatter.split(text)
    if raw is None:
        raise SkillbookError("SKILL.md has no frontmatter; add one before recording tested-with versions")
    lines = text.split("\n")
    end = body_line - 2  # index of the closing '---'
    value = f'"{spec}"'
    meta = next((i for i in range(1, end) if re.match(r"^metadata\s*:\s*$", lines[i])), None)
    if meta is None:
        lines[end:end] = ["metadata:", f"  {KEY}: {value}"]
        return "\n".join(lines)
    i = meta + 1
    indent = "  "
    while i < end and (lines[i].startswith((" ", "\t")) or not lines[i].strip()):
        m = re.match(rf"^(\s+){re.escape(KEY)}\s*:", lines[i])
        if m:
            lines[i] = f"{m.group(1)}{KEY}: {value}"
            return "\n".join(lines)
        if lines[i].strip():
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        i += 1
    last = i
    while last - 1 > meta and not lines[last - 1].strip():
        last -= 1
    lines.insert(last, f"{indent}{KEY}: {value}")
    return "\n".join(lines)


def update(skill: Skill, packages: list[str] | None = None) -> str:
    """Record the installed versions of the skill's libraries in its SKILL.md; return the new spec."""
    names = sorted({canonical(n) for n in [*(packages or []), *recorded(skill), *used_packages(skill)]})
    spec = render(current_spec(names))
    if not spec:
        raise SkillbookError(
            f"skill '{skill.name}' uses none of the tracked libraries; pass --package NAME to record one"
        )
    new = set_tested_with(skill.skill_md.read_bytes().decode("utf-8"), spec)
    check_fm = frontmatter.parse(new)
    if check_fm.problems:
        raise SkillbookError(f"refusing to write {skill.skill_md}: {check_fm.problems[0].message}")
    skill.skill_md.write_bytes(new.encode("utf-8"))
    return spec
