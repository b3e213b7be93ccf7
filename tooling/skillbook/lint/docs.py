"""Document rules (SB202-SB210): links resolve and stay in skills/, references layout, code blocks, tested-with,
measured tables that match their recorded run."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from skillbook.catalog import Skill, markdown, measured, versions
from skillbook.catalog.codeblocks import documents, is_executed
from skillbook.errors import SkillbookError
from skillbook.lint.findings import Finding, err


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
    for path, text, first in documents(skill):
        _, links, _ = markdown.scan(text, first)
        for link in links:
            if not markdown.is_relative(link.target):
                continue
            target = link.target.split("#", 1)[0]
            if target and not _exists_case_sensitive(path.parent, target):
                yield err(
                    "SB202", path, link.line, f"link target '{link.target}' does not exist (paths are case-sensitive)"
                )


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
    linked = {Path(link.target.split("#")[0]).name for link in links if markdown.is_relative(link.target)}
    for ref in skill.references:
        if ref.name not in linked:
            yield err(
                "SB203",
                ref,
                0,
                f"references/{ref.name} is not linked from SKILL.md; link it and say when to read it",
                "warning",
            )


def rule_code_blocks(skill: Skill) -> Iterator[Finding]:
    """SB204 fences carry a language; SB205 Python blocks parse; SB206 each skill has an executed block."""
    executed = 0
    for path, text, first in documents(skill):
        blocks, _, _ = markdown.scan(text, first)
        for block in blocks:
            if not block.lang:
                yield err(
                    "SB204",
                    path,
                    block.line,
                    "code block has no language: write ```python, ```bash, ```yaml, ```text …",
                )
                continue
            if block.lang in ("python", "py"):
                try:
                    ast.parse(block.code)
                except SyntaxError as exc:
                    yield err("SB205", path, block.line + (exc.lineno or 0), f"Python block does not parse: {exc.msg}")
            executed += is_executed(block)
    if skill.text and executed == 0:
        yield err(
            "SB206",
            skill.skill_md,
            skill.body_line,
            "no executed code block: add at least one runnable ```python or ```bash block (CI runs it)",
        )


def rule_tested_with(skill: Skill) -> Iterator[Finding]:
    """SB207: `metadata.tested-with` is a list of NAME==VERSION items (staleness is `skills doctor`'s job)."""
    spec = skill.metadata.get(versions.KEY)
    if spec is None:
        return
    try:
        versions.parse(spec)
    except SkillbookError as exc:
        yield err("SB207", skill.skill_md, 0, f"{exc}; `skills doctor --update {skill.name}` writes a valid one")


def rule_links_stay_in_skills(skill: Skill) -> Iterator[Finding]:
    """SB208: relative links stay inside skills/, so copies made by `skills install` still resolve."""
    skills_dir = skill.path.resolve().parent
    for path, text, first in documents(skill):
        _, links, _ = markdown.scan(text, first)
        for link in links:
            target = link.target.split("#", 1)[0]
            if not markdown.is_relative(link.target) or not target:
                continue
            resolved = (path.parent / target).resolve()
            if skills_dir not in resolved.parents:
                yield err(
                    "SB208",
                    path,
                    link.line,
                    f"link '{link.target}' leaves skills/ and breaks in installed copies; "
                    "link the docs site or name the file in text instead",
                    "warning",
                )


def rule_measured(skill: Skill) -> Iterator[Finding]:
    """SB209 a measured block equals what its measured.json renders; SB210 the record is not stale."""
    text = skill.text  # None when SKILL.md is missing or unreadable (SB1xx says so)
    if not text:
        return
    try:
        found = measured.problems(skill.path, text, versions.recorded(skill))
    except SkillbookError as exc:
        yield err("SB209", skill.path / measured.RECORD, 0, str(exc))
        return
    for code, severity, message in found:
        yield err(code, skill.skill_md, _line_of(text, measured.START), message, severity)


def _line_of(text: str, needle: str) -> int:
    at = text.find(needle)
    return text.count("\n", 0, at) + 1 if at >= 0 else 0
