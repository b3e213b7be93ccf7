"""`skills lint`: one function per rule, each yielding Findings with a code, severity and file:line.

Rule families live in their own modules (spec, docs, recipes, repo); this module runs them. Lint never
crashes on malformed input: every problem, even an unexpected exception inside a rule, becomes a finding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from skillbook import catalog
from skillbook.catalog import Skill
from skillbook.lint import docs, recipes, repo, spec
from skillbook.lint.findings import Finding, err

SKILL_RULES: list[Callable[[Skill], Iterable[Finding]]] = [
    spec.rule_frontmatter,
    spec.rule_stage,
    spec.rule_body_length,
    docs.rule_links,
    docs.rule_references_layout,
    docs.rule_code_blocks,
    recipes.rule_recipe,
    recipes.rule_overrides_only,
    docs.rule_tested_with,
    docs.rule_links_stay_in_skills,
    docs.rule_measured,
]
REPO_RULES: list[Callable[[Path], Iterable[Finding]]] = [
    repo.rule_pipelines,
    repo.rule_schemas,
    repo.rule_marketplace,
    repo.rule_pipeline_measured,
]

__all__ = ["Finding", "err", "lint_paths", "lint_repo", "lint_skill", "REPO_RULES", "SKILL_RULES"]


def lint_skill(path: Path) -> list[Finding]:
    skill = catalog.load_skill(path)
    findings: list[Finding] = []
    for rule in SKILL_RULES:
        try:
            findings.extend(rule(skill))
        except Exception as exc:  # noqa: BLE001 - a rule bug must not hide other findings
            findings.append(
                err("SB999", skill.skill_md, 0, f"{rule.__name__} failed on this input: {type(exc).__name__}: {exc}")
            )
    return findings


def lint_repo(root: Path | None = None) -> list[Finding]:
    root = root or catalog.repo_root()
    findings = [f for p in catalog.skill_dirs(root) for f in lint_skill(p)]
    for rule in REPO_RULES:
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
