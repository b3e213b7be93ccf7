"""`skills lint`: one function per rule, each yielding Findings with a code, severity and file:line.

Lint never crashes on malformed input: every problem, even an unexpected exception inside a
rule, becomes a finding.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import catalog, markdown
from .catalog import Skill

MAX_BODY_LINES = 500
EXECUTED_LANGS = {"python", "py", "bash", "sh", "shell"}
MARKERS = {"fragment", "gpu", "hub", "slow", "no-run"}
HEAVY_MODULES = {"torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers",
                 "sentencepiece", "llama_cpp", "vllm", "onnxruntime", "gguf", "numpy", "matplotlib"}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # "error" | "warning"
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code} [{self.severity}] {self.message}"

    def as_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "path": self.path, "line": self.line, "message": self.message}


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def err(code: str, path: Path, line: int, message: str, severity: str = "error") -> Finding:
    return Finding(code, severity, _rel(path), max(line, 0), message)


def is_executed(block: markdown.CodeBlock) -> bool:
    """A block CI runs: Python, or a shell block, not marked fragment/gpu/hub/slow/no-run."""
    return block.lang in EXECUTED_LANGS and not (set(block.flags) & MARKERS)


# ---------------------------------------------------------------------------------------------
# Skill rules: each takes a parsed Skill and yields findings
# ---------------------------------------------------------------------------------------------


def rule_frontmatter(skill: Skill) -> Iterator[Finding]:
    """SB100-SB109: the Agent Skills spec on the frontmatter, exactly."""
    for p in skill.problems:
        yield err(p.code, skill.skill_md, p.line, p.message)


def rule_stage(skill: Skill) -> Iterator[Finding]:
    """SB110: metadata.stage is one of the lifecycle stages the catalog and site group by."""
    stage = skill.metadata.get("stage")
    if skill.text and stage not in catalog.STAGES:
        yield err("SB110", skill.skill_md, 1, f"metadata.stage {stage!r} should be one of {', '.join(catalog.STAGES)}", "warning")


def rule_body_length(skill: Skill) -> Iterator[Finding]:
    """SB201: body at most 500 lines; the rest belongs in references/."""
    n = len(skill.body.rstrip("\n").split("\n")) if skill.body.strip() else 0
    if n > MAX_BODY_LINES:
        yield err("SB201", skill.skill_md, skill.body_line, f"body is {n} lines; keep it ≤ {MAX_BODY_LINES} and move details to references/")
    if skill.text and not skill.body.strip():
        yield err("SB201", skill.skill_md, skill.body_line, "body is empty: add an overview, a quick start and the defaults that work")


def _docs(skill: Skill) -> Iterator[tuple[Path, str, int]]:
    """SKILL.md body and every reference file as (path, text, first line)."""
    if skill.text:
        yield skill.skill_md, skill.body, skill.body_line
    for ref in skill.references:
        text, problem = catalog.read_text(ref)
        if problem is None:
            yield ref, text, 1


def _exists_case_sensitive(base: Path, rel: str) -> bool:
    path = base
    for part in Path(rel).parts:
        if part in ("", "."):
            continue
        if part == "..":
            path = path.parent
            continue
        if not path.is_dir() or part not in {p.name for p in path.iterdir()}:
            return False
        path = path / part
    return True


def rule_links(skill: Skill) -> Iterator[Finding]:
    """SB202: every relative link resolves, case-sensitively."""
    for path, text, first in _docs(skill):
        _, links, _ = markdown.scan(text, first)
        for link in links:
            if not markdown.is_relative(link.target):
                continue
            target = link.target.split("#", 1)[0]
            if target and not _exists_case_sensitive(path.parent, target):
                yield err("SB202", path, link.line, f"link target '{link.target}' does not exist (paths are case-sensitive)")


def rule_references_layout(skill: Skill) -> Iterator[Finding]:
    """SB203: references are one level deep and each is linked from SKILL.md."""
    ref_dir = skill.path / "references"
    if not ref_dir.is_dir():
        return
    for sub in sorted(p for p in ref_dir.iterdir() if p.is_dir()):
        yield err("SB203", sub, 0, "references/ must be one level deep: move these files up into references/")
    if not skill.text:
        return
    _, links, _ = skill.scan()
    linked = {Path(l.target.split("#")[0]).name for l in links if markdown.is_relative(l.target)}
    for ref in skill.references:
        if ref.name not in linked:
            yield err("SB203", ref, 0, f"references/{ref.name} is not linked from SKILL.md; link it and say when to read it", "warning")


def rule_code_blocks(skill: Skill) -> Iterator[Finding]:
    """SB204 fences carry a language; SB205 Python blocks parse; SB206 each skill has an executed block."""
    executed = 0
    for path, text, first in _docs(skill):
        blocks, _, _ = markdown.scan(text, first)
        for block in blocks:
            if not block.lang:
                yield err("SB204", path, block.line, "code block has no language: write ```python, ```bash, ```yaml, ```text …")
                continue
            if block.lang in ("python", "py"):
                try:
                    ast.parse(block.code)
                except SyntaxError as exc:
                    yield err("SB205", path, block.line + (exc.lineno or 0), f"Python block does not parse: {exc.msg}")
            executed += is_executed(block)
    if skill.text and executed == 0:
        yield err("SB206", skill.skill_md, skill.body_line,
                  "no executed code block: add at least one runnable ```python or ```bash block (CI runs it)")


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
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            if name.split(".")[0] in HEAVY_MODULES:
                yield err("SB304", path, node.lineno, f"module-level import of '{name}': import it inside run() so `skills list/lint` stay fast")
    from . import recipe as recipe_mod

    try:
        rec = recipe_mod.load(skill.path)
    except Exception as exc:  # noqa: BLE001 - any import failure is a finding
        yield err("SB301", path, 0, f"recipe.py cannot be loaded: {exc}")
        return
    declared = [(k, kind) for k, v in {**rec.OUTPUTS, **rec.INPUTS}.items() for kind in str(v).split("|")]
    bad_kinds = {k: kind for k, kind in declared if kind not in recipe_mod.ARTIFACT_KINDS}
    if bad_kinds:
        yield err("SB301", path, 0, f"unknown artifact kinds {bad_kinds}; known: {', '.join(recipe_mod.ARTIFACT_KINDS)}")
    default = skill.path / "recipe.yaml"
    if not default.is_file():
        yield err("SB302", default, 0, "recipe.yaml (the CPU-tiny default config) is missing")
    else:
        first = default.read_text().split("\n", 1)[0]
        if f"schemas/{rec.name}.schema.json" not in first:
            yield err("SB302", default, 1, f"first line must point at its schema: '# yaml-language-server: $schema=../../schemas/{rec.name}.schema.json'")
    # Artifact inputs with no default (e.g. `model`) come from the command line or a pipeline step.
    required_inputs = {k: "/placeholder" for k, f in rec.Config.model_fields.items() if k in rec.INPUTS and f.is_required()}
    for preset in [None, *rec.presets()]:
        try:
            data = recipe_mod.layered_data(rec, preset=preset)
            recipe_mod.validate(rec.Config, {**required_inputs, **data}, f"skill '{rec.name}'")
        except Exception as exc:  # noqa: BLE001
            where = skill.path / "configs" / f"{preset}.yaml" if preset else default
            yield err("SB303", where, 0, str(exc).replace("\n", " "))


SKILL_RULES: list[Callable[[Skill], Iterable[Finding]]] = [
    rule_frontmatter, rule_stage, rule_body_length, rule_links, rule_references_layout, rule_code_blocks, rule_recipe,
]


def lint_skill(path: Path) -> list[Finding]:
    from . import lint_extra  # knowledge-quality rules; imported here because they import this module

    skill = catalog.load_skill(path)
    findings: list[Finding] = []
    for rule in [*SKILL_RULES, *lint_extra.SKILL_RULES]:
        try:
            findings.extend(rule(skill))
        except Exception as exc:  # noqa: BLE001 - a rule bug must not hide other findings
            findings.append(err("SB999", skill.skill_md, 0, f"{rule.__name__} failed on this input: {type(exc).__name__}: {exc}"))
    return findings


# ---------------------------------------------------------------------------------------------
# Repository rules
# ---------------------------------------------------------------------------------------------


def rule_pipelines(root: Path) -> Iterator[Finding]:
    """SB401: every pipeline validates (configs, references, artifact kinds)."""
    from . import pipeline

    for path in catalog.pipeline_files(root):
        validate = getattr(pipeline, "validate_file", None)
        if validate is None:
            return
        for problem in validate(path):
            yield err("SB401", path, 0, problem)


def rule_schemas(root: Path) -> Iterator[Finding]:
    """SB501: checked-in schemas equal the generated ones."""
    from . import schemas

    try:
        drift = schemas.check(root)
    except Exception as exc:  # noqa: BLE001
        drift = [f"schemas cannot be generated: {exc}"]
    for line in drift:
        yield err("SB501", root / "schemas", 0, line)


def lint_repo(root: Path | None = None) -> list[Finding]:
    root = root or catalog.repo_root()
    findings = [f for p in catalog.skill_dirs(root) for f in lint_skill(p)]
    from . import lint_extra

    for rule in (rule_pipelines, rule_schemas, *lint_extra.REPO_RULES):
        try:
            findings.extend(rule(root))
        except Exception as exc:  # noqa: BLE001
            findings.append(err("SB999", root, 0, f"{rule.__name__} failed: {type(exc).__name__}: {exc}"))
    return findings


def lint_paths(paths: list[Path]) -> list[Finding]:
    """Lint skill folders, SKILL.md files, a skills/ folder or a repository root."""
    findings: list[Finding] = []
    for path in paths:
        path = Path(path)
        if path.name == "SKILL.md":
            path = path.parent
        if not path.exists():
            findings.append(err("SB100", path, 0, "path does not exist"))
        elif (path / "skills").is_dir():
            findings.extend(lint_repo(path))
        elif (path / "SKILL.md").exists() or (path / "recipe.py").exists():
            findings.extend(lint_skill(path))
        elif path.is_dir() and any((p / "SKILL.md").exists() for p in path.iterdir() if p.is_dir()):
            for sub in sorted(p for p in path.iterdir() if p.is_dir()):
                findings.extend(lint_skill(sub))
        else:
            findings.extend(lint_skill(path))
    return findings
