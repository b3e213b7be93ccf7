"""Pipelines: recipes/<name>.yaml chains skills; `${steps.<id>.<output>}` wires outputs to inputs."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

REF_RE = re.compile(r"\$\{steps\.([a-z0-9_-]+)\.([a-z0-9_-]+)\}")


class StepSpec(BaseModel):
    """One pipeline step: a skill run with a config, possibly referring to earlier outputs."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Step id, unique in the pipeline.")
    skill: str = Field(..., description="Skill folder name under skills/.")
    preset: str | None = Field(None, description="Preset from the skill's configs/ folder.")
    config: dict = Field(default_factory=dict, description="Config fields; values may be ${steps.<id>.<output>}.")


class PipelineSpec(BaseModel):
    """A pipeline file under recipes/."""

    model_config = ConfigDict(extra="forbid", title="Skillbook pipeline")
    name: str = Field(..., description="Pipeline name (the file stem).")
    description: str = Field(..., description="What the pipeline produces and when to run it.")
    report: bool = Field(True, description="Write a side-by-side run report with plots at the end.")
    steps: list[StepSpec] = Field(..., min_length=1)
