"""`skills new`: a skill folder from jinja2 templates that passes lint and whose recipe runs."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from skillbook import catalog
from skillbook.catalog import frontmatter
from skillbook.errors import SkillbookError


def new_skill(name: str, description: str | None = None, stage: str = "other", root: Path | None = None) -> Path:
    """Create skills/<name>/ with SKILL.md, references/, recipe.py and recipe.yaml."""
    problems = frontmatter.check({"name": name, "description": "x"})
    if problems:
        raise SkillbookError(problems[0].message)
    root = root or catalog.repo_root()
    path = root / "skills" / name
    if path.exists():
        raise SkillbookError(f"{path} already exists; pick another name or edit it")
    description = description or (
        f"Runs the {name} recipe on CPU-tiny defaults. Use when you need a starting "
        f"point for {name.replace('-', ' ')}; replace this text with what the skill does and when to use it."
    )
    env = Environment(
        loader=PackageLoader("skillbook", "templates/skill"), undefined=StrictUndefined, keep_trailing_newline=True
    )
    files = {
        "SKILL.md": "SKILL.md.j2",
        "recipe.py": "recipe.py.j2",
        "recipe.yaml": "recipe.yaml.j2",
        "references/guide.md": "guide.md.j2",
    }
    rendered = {
        out: env.get_template(tpl).render(
            name=name, description=description, stage=stage, title=name.replace("-", " ").capitalize()
        )
        for out, tpl in files.items()
    }
    for rel, text in rendered.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return path
