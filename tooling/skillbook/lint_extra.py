"""Knowledge-quality lint rules (issue 7), kept apart from lint.py's core rules.

lint.lint_skill and lint.lint_repo run them after the core rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from . import markdown
from .catalog import Skill
from .errors import SkillbookError
from .lint import Finding, err


def rule_tested_with(skill: Skill) -> Iterator[Finding]:
    """SB207: `metadata.tested-with` is a list of NAME==VERSION items (staleness is `skills doctor`'s job)."""
    from . import versions

    spec = skill.metadata.get(versions.KEY)
    if spec is None:
        return
    try:
        versions.parse(spec)
    except SkillbookError as exc:
        yield err("SB207", skill.skill_md, 0, f"{exc}; `skills doctor --update {skill.name}` writes a valid one")


def rule_links_stay_in_skills(skill: Skill) -> Iterator[Finding]:
    """SB208: relative links stay inside skills/, so copies made by `skills install` still resolve."""
    from .lint import _docs

    skills_dir = skill.path.resolve().parent
    for path, text, first in _docs(skill):
        _, links, _ = markdown.scan(text, first)
        for link in links:
            target = link.target.split("#", 1)[0]
            if not markdown.is_relative(link.target) or not target:
                continue
            resolved = (path.parent / target).resolve()
            if skills_dir not in resolved.parents:
                yield err("SB208", path, link.line, f"link '{link.target}' leaves skills/ and breaks in installed copies; "
                          "link the docs site or name the file in text instead", "warning")


def rule_marketplace(root: Path) -> Iterator[Finding]:
    """SB601: .claude-plugin/marketplace.json equals the one generated from the catalog."""
    from . import agent

    for line in agent.marketplace_drift(root):
        yield err("SB601", root / agent.MARKETPLACE, 0, line)


SKILL_RULES = [rule_tested_with, rule_links_stay_in_skills]
REPO_RULES = [rule_marketplace]
