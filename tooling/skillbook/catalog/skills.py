"""Find skills and pipelines in a repository and build the catalog index."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from skillbook.catalog import frontmatter, markdown
from skillbook.errors import SkillNotFound

# Lifecycle stages, in the order a model goes through them (metadata.stage in SKILL.md).
STAGES = ("data", "training", "post-training", "evaluation", "deploy", "other")


def repo_root(start: Path | None = None) -> Path:
    """The Skillbook checkout: $SKILLBOOK_ROOT, else the nearest parent holding skills/."""
    env = os.environ.get("SKILLBOOK_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for cand in (here, *here.parents):
        if (cand / "skills").is_dir() and (cand / "pyproject.toml").is_file():
            return cand
    # Installed from a checkout: fall back to the tree this package lives in.
    return Path(__file__).resolve().parents[3]


@dataclass
class Skill:
    """One skill folder: frontmatter, body and the facts lint and the site need."""

    path: Path
    meta: dict = field(default_factory=dict)
    body: str = ""
    body_line: int = 1
    problems: list[frontmatter.Problem] = field(default_factory=list)
    text: str = ""

    @property
    def folder(self) -> str:
        return self.path.name

    @property
    def name(self) -> str:
        name = self.meta.get("name")
        return name if isinstance(name, str) else self.folder

    @property
    def description(self) -> str:
        desc = self.meta.get("description")
        return desc if isinstance(desc, str) else ""

    @property
    def metadata(self) -> dict[str, str]:
        meta = self.meta.get("metadata")
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}

    @property
    def stage(self) -> str:
        return self.metadata.get("stage", "other")

    @property
    def skill_md(self) -> Path:
        return self.path / "SKILL.md"

    @property
    def has_recipe(self) -> bool:
        return (self.path / "recipe.py").is_file()

    @property
    def references(self) -> list[Path]:
        ref = self.path / "references"
        return sorted(ref.glob("*.md")) if ref.is_dir() else []

    @property
    def presets(self) -> list[str]:
        cfg = self.path / "configs"
        return sorted(p.stem for p in cfg.glob("*.yaml")) if cfg.is_dir() else []

    def scan(self):
        """(code blocks, links, headings) of the SKILL.md body."""
        return markdown.scan(self.body, self.body_line)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "stage": self.stage,
            "path": str(self.path),
            "skill_md": str(self.skill_md),
            "metadata": self.metadata,
            "references": [p.name for p in self.references],
            "presets": self.presets,
            "recipe": self.has_recipe,
        }


def read_text(path: Path) -> tuple[str, str | None]:
    """Read a file as UTF-8; return (text, error) so callers never crash on junk."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return "", f"cannot read {path.name}: {exc.strerror or exc}"
    if b"\x00" in data[:8192]:
        return "", f"{path.name} looks binary (NUL bytes); it must be UTF-8 Markdown"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return "", f"{path.name} is not UTF-8 (byte {exc.start})"


def load_skill(path: Path) -> Skill:
    """Parse one skill folder. Problems are recorded on the Skill, never raised."""
    skill = Skill(path=path)
    md = path / "SKILL.md"
    if not md.is_file():
        skill.problems.append(frontmatter.Problem("SB100", "missing SKILL.md", 0))
        return skill
    text, err = read_text(md)
    if err:
        skill.problems.append(frontmatter.Problem("SB100", err, 0))
        return skill
    fm = frontmatter.parse(text)
    skill.text, skill.meta, skill.body, skill.body_line = text, fm.data, fm.body, fm.body_line
    skill.problems = fm.problems
    if fm.data:
        skill.problems += [
            p for p in frontmatter.check({"name": fm.data.get("name")}, folder=path.name) if p.code == "SB106"
        ]
    return skill


def skill_dirs(root: Path) -> list[Path]:
    base = root / "skills"
    return (
        sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))) if base.is_dir() else []
    )


def load_all(root: Path | None = None) -> list[Skill]:
    return [load_skill(p) for p in skill_dirs(root or repo_root())]


def find(name: str, root: Path | None = None) -> Skill:
    """The skill called `name`, or SkillNotFound with a did-you-mean."""
    import difflib

    root = root or repo_root()
    names = [p.name for p in skill_dirs(root)]
    if not frontmatter.NAME_RE.match(name):  # a name, never a path: no separators, no '..', no absolute dirs
        raise SkillNotFound(
            f"'{name}' is not a skill name: name a skill by its folder under skills/ "
            f"(lowercase letters, digits and '-', no '/' or '..'); known skills: {', '.join(names)}"
        )
    path = root / "skills" / name
    if (path / "SKILL.md").is_file():
        return load_skill(path)
    near = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else f"; known skills: {', '.join(names)}"
    raise SkillNotFound(f"no skill named '{name}'{hint}")


def pipeline_files(root: Path | None = None) -> list[Path]:
    base = (root or repo_root()) / "recipes"
    return sorted(base.glob("*.yaml")) if base.is_dir() else []


def index(root: Path | None = None) -> dict:
    """The JSON catalog: every skill's summary and every pipeline's name."""
    root = root or repo_root()
    return {
        "skills": [s.summary() for s in load_all(root)],
        "pipelines": [p.stem for p in pipeline_files(root)],
    }


def write_index(out: Path, root: Path | None = None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(index(root), indent=2) + "\n")
    return out
