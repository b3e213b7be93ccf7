"""Repository rules (SB401, SB501, SB601, SB209/SB210 for pipelines): pipelines validate, schemas, the
marketplace and pipelines' measured blocks match their sources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from skillbook import agent, catalog
from skillbook.catalog import measured
from skillbook.errors import SkillbookError
from skillbook.lint.findings import Finding, err
from skillbook.run import pipeline, schemas


def rule_pipelines(root: Path) -> Iterator[Finding]:
    """SB401: every pipeline validates (configs, references, artifact kinds), the sweeps under recipes/sweeps/ too."""
    sweeps = sorted((root / "recipes" / "sweeps").glob("*.yaml"))
    for path in [*catalog.pipeline_files(root), *sweeps]:
        validate = getattr(pipeline, "validate_file", None)
        if validate is None:
            return
        for problem in validate(path):
            yield err("SB401", path, 0, problem)


def rule_schemas(root: Path) -> Iterator[Finding]:
    """SB501: checked-in schemas equal the generated ones."""
    try:
        drift = schemas.check(root)
    except Exception as exc:  # noqa: BLE001
        drift = [f"schemas cannot be generated: {exc}"]
    for line in drift:
        yield err("SB501", root / "schemas", 0, line)


def rule_marketplace(root: Path) -> Iterator[Finding]:
    """SB601: .claude-plugin/marketplace.json equals the one generated from the catalog."""
    for line in agent.marketplace_drift(root):
        yield err("SB601", root / agent.MARKETPLACE, 0, line)


def rule_pipeline_measured(root: Path) -> Iterator[Finding]:
    """SB209/SB210: a pipeline's measured block (README's speedrun table) equals its recipes/NAME.measured.json."""
    for path in measured.pipeline_records(root):
        try:
            found = measured.pipeline_problems(root, path)
        except SkillbookError as exc:
            yield err("SB209", path, 0, str(exc))
            continue
        for code, severity, message in found:
            yield err(code, path, 0, message, severity)
