"""Agent Skills spec rules (SB1xx, SB201): frontmatter, lifecycle stage, body length."""

from __future__ import annotations

from collections.abc import Iterator

from skillbook import catalog
from skillbook.catalog import Skill
from skillbook.lint.findings import Finding, err

MAX_BODY_LINES = 500


def rule_frontmatter(skill: Skill) -> Iterator[Finding]:
    """SB100-SB109: the Agent Skills spec on the frontmatter, exactly."""
    for p in skill.problems:
        yield err(p.code, skill.skill_md, p.line, p.message)


def rule_stage(skill: Skill) -> Iterator[Finding]:
    """SB110: metadata.stage is one of the lifecycle stages the catalog and site group by."""
    stage = skill.metadata.get("stage")
    if skill.text and stage not in catalog.STAGES:
        yield err(
            "SB110",
            skill.skill_md,
            1,
            f"metadata.stage {stage!r} should be one of {', '.join(catalog.STAGES)}",
            "warning",
        )


def rule_body_length(skill: Skill) -> Iterator[Finding]:
    """SB201: body at most 500 lines; the rest belongs in references/."""
    n = len(skill.body.rstrip("\n").split("\n")) if skill.body.strip() else 0
    if n > MAX_BODY_LINES:
        yield err(
            "SB201",
            skill.skill_md,
            skill.body_line,
            f"body is {n} lines; keep it ≤ {MAX_BODY_LINES} and move details to references/",
        )
    if skill.text and not skill.body.strip():
        yield err(
            "SB201",
            skill.skill_md,
            skill.body_line,
            "body is empty: add an overview, a quick start and the defaults that work",
        )
