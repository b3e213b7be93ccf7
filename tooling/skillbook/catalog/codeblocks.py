"""Code blocks in a skill's documents: which ones CI executes, which are marked, which fixtures they use.

A block runs in CI when it is Python or shell and carries none of the not-run markers (```python fragment,
```bash gpu, ```bash hub, ```bash no-run). A ```bash slow block runs too, as a smoke run: the placeholders
`runs/<skill>/latest/<output>` resolve to the fixture runs and the runner caps its steps (run.examples).
Lint counts them, `skills doctor` reports them, and `run.examples` executes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from skillbook.catalog import markdown
from skillbook.catalog.skills import Skill, read_text, repo_root

EXECUTED_LANGS = {"python", "py", "bash", "sh", "shell"}
MARKERS = {"fragment", "gpu", "hub", "no-run"}  # not run: the block must still parse
SMOKE = "slow"  # run, but as a smoke run (capped steps, placeholders -> fixture runs)
ALL_MARKERS = MARKERS | {SMOKE}
# `runs/<skill>/latest/<output>` or `runs/<skill>/<run>/<output>`: what users copy after their own run.
RUNS_RE = re.compile(r"(?<![\w./$-])runs/([a-z0-9][a-z0-9-]*)/[^/\s'\"]+/")


def is_executed(block: markdown.CodeBlock) -> bool:
    """A block CI runs: Python, or a shell block, not marked fragment/gpu/hub/no-run (`slow` runs, capped)."""
    return block.lang in EXECUTED_LANGS and not (set(block.flags) & MARKERS)


PYTHON_LANGS = {"python", "py"}

# The fixture layer: variable -> (conftest fixture that makes it, output name of that recipe run).
FIXTURE_VARS: dict[str, tuple[str, str]] = {
    "SKILLBOOK_CORPUS": ("prepared", "corpus"),
    "SKILLBOOK_SFT_DATA": ("prepared", "sft_data"),
    "SKILLBOOK_PREFERENCE_DATA": ("prepared", "preference_data"),
    "SKILLBOOK_EVAL_DATA": ("prepared", "eval_data"),
    "SKILLBOOK_TOKENIZER": ("tokenizer_dir", "tokenizer"),
    "SKILLBOOK_MODEL": ("pretrained_model", "model"),
}
_VAR_RE = re.compile(r"SKILLBOOK_[A-Z_]+")


@dataclass(frozen=True)
class Example:
    """One code block of a skill, with where it lives."""

    skill: str
    path: Path
    block: markdown.CodeBlock

    @property
    def executed(self) -> bool:
        return is_executed(self.block)

    @property
    def line(self) -> int:
        return self.block.line

    @property
    def kind(self) -> str:
        return "python" if self.block.lang in PYTHON_LANGS else "bash"

    def where(self, root: Path | None = None) -> str:
        return f"{display_path(self.path, root)}:{self.line}"

    @property
    def smoke(self) -> bool:
        """A ```bash slow block: run under the smoke cap, against the fixture runs."""
        return self.executed and SMOKE in self.block.flags

    def needs(self) -> set[str]:
        """The fixture variables this block mentions."""
        return set(_VAR_RE.findall(self.block.code)) & set(FIXTURE_VARS)

    def run_skills(self) -> set[str]:
        """Skills whose runs a smoke block reads through a `runs/<skill>/...` placeholder."""
        return set(RUNS_RE.findall(self.block.code)) if self.smoke else set()


def display_path(path: Path, root: Path | None = None) -> str:
    """A path as people type it: relative to the working directory, else to the repository."""
    for base in (Path.cwd(), root or repo_root()):
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)


# ---------------------------------------------------------------------------------------------
# Collect
# ---------------------------------------------------------------------------------------------


def documents(skill: Skill) -> list[tuple[Path, str, int]]:
    """SKILL.md body and each references/*.md as (path, text, first line)."""
    docs = [(skill.skill_md, skill.body, skill.body_line)] if skill.text else []
    for ref in skill.references:
        text, problem = read_text(ref)
        if problem is None:
            docs.append((ref, text, 1))
    return docs


def collect(skill: Skill) -> list[Example]:
    """Every Python/shell block of a skill, executed or marked, in file order."""
    out = []
    for path, text, first in documents(skill):
        blocks, _, _ = markdown.scan(text, first)
        out += [Example(skill.name, path, b) for b in blocks if b.lang in EXECUTED_LANGS]
    return out


def counts(skill: Skill) -> dict:
    """Executed (smoke runs of `slow` blocks included, also counted as `smoke`) vs not-run blocks, and the
    not-run markers used (for `skills doctor`)."""
    examples = collect(skill)
    markers: dict[str, int] = {}
    for ex in examples:
        for flag in set(ex.block.flags) & MARKERS:
            markers[flag] = markers.get(flag, 0) + 1
    executed = sum(ex.executed for ex in examples)
    smoke = sum(ex.smoke for ex in examples)
    return {"executed": executed, "marked": len(examples) - executed, "markers": markers, "smoke": smoke}


def needs(examples: list[Example]) -> set[str]:
    """Fixture variables any executed example mentions."""
    return set().union(*(ex.needs() for ex in examples if ex.executed)) if examples else set()


def run_needs(examples: list[Example]) -> set[str]:
    """Skills whose fixture runs any smoke block reads through a `runs/<skill>/...` placeholder."""
    return set().union(*(ex.run_skills() for ex in examples)) if examples else set()
