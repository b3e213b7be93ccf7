"""`skills install`: copy or link skills into an agent's skills directory, never over a user's edits."""

from __future__ import annotations

import json
from pathlib import Path

from skillbook import catalog
from skillbook.catalog.frontmatter import NAME_RE

MANIFEST = ".skillbook-install.json"
AGENT_DIRS = {
    "agents": ".agents/skills",
    "claude": ".claude/skills",
    "codex": ".codex/skills",
    "cursor": ".cursor/skills",
    "gemini": ".gemini/skills",
}
_SKIP_DIRS = {"__pycache__", "runs", ".ipynb_checkpoints"}


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def skill_files(src: Path) -> dict[str, str]:
    """The files that make a skill (relative path -> sha256): no caches, run dirs or hidden files."""
    out = {}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") or part in _SKIP_DIRS for part in rel.parts) or path.suffix == ".pyc":
            continue
        if path.is_file():
            out[rel.as_posix()] = _sha(path)
    return out


def _inside(path: Path, base: Path) -> bool:
    """Whether `path` (symlinks and '..' resolved) lies strictly inside `base`."""
    real, top = path.resolve(), base.resolve()
    return real != top and real.is_relative_to(top)


def _manifest(target: Path) -> dict[str, str]:
    """The files a previous install wrote; entries that would point outside `target` are ignored."""
    try:
        data = json.loads((target / MANIFEST).read_text())
        files = dict(data.get("files", {}))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}
    return {rel: sha for rel, sha in files.items() if isinstance(rel, str) and _inside(target / rel, target)}


def _conflicts(target: Path, files: dict[str, str], replace_dir: bool = False) -> list[str]:
    """Files under an installed skill that the user changed (or that Skillbook did not put there).

    `replace_dir` (linking over a copy) deletes the whole folder, so files the user added count too.
    """
    if target.is_symlink() or not target.exists():
        return []
    if not target.is_dir():
        return [f"{target} (a file, not a skill folder)"]
    before = _manifest(target)
    extra = set(skill_files(target)) - set(files) - set(before) if replace_dir else set()
    out = []
    for rel in sorted(set(files) | set(before) | extra):
        dst = target / rel
        if not dst.is_file():
            continue
        now = _sha(dst)
        if now == files.get(rel) or now == before.get(rel):
            continue
        out.append(f"{dst} ({'modified since install' if rel in before else 'not installed by skillbook'})")
    return out


def _write_copy(src: Path, target: Path, files: dict[str, str]) -> str:
    """Copy the skill, refresh unchanged files, drop files the skill no longer has; return the action."""
    import shutil

    from skillbook.errors import SkillbookError

    if target.is_symlink():
        target.unlink()
    fresh = not target.exists()
    before = _manifest(target)
    changed = False
    for rel, digest in files.items():
        dst = target / rel
        if not _inside(dst, target):
            raise SkillbookError(f"refusing to write {dst}: it resolves outside {target} (a symlink inside it?)")
        if dst.is_file() and _sha(dst) == digest:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst)
        shutil.copymode(src / rel, dst)
        changed = True
    for rel in set(before) - set(files):  # removed upstream; unchanged locally (checked by _conflicts)
        (target / rel).unlink(missing_ok=True)
        changed = True
    manifest = {
        "skill": target.name,
        "source": f"skills/{src.name}",
        "skillbook": _version(),
        "mode": "copy",
        "files": files,
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return "installed" if fresh else "updated" if changed else "unchanged"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("skillbook")
    except metadata.PackageNotFoundError:
        return "unknown"


def _write_link(src: Path, target: Path) -> str:
    import shutil

    if target.is_symlink():
        same = target.resolve() == src.resolve()
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
        same = False
    else:
        same = False
    target.symlink_to(src.resolve(), target_is_directory=True)
    return "unchanged" if same else "linked"


def install(
    names: list[str],
    to: Path,
    all_skills: bool = False,
    link: bool = False,
    force: bool = False,
    root: Path | None = None,
) -> list[dict]:
    """Copy (or symlink) skills into `to`/<name>/; refuse to overwrite files the user changed unless `force`."""
    from skillbook.errors import SkillbookError

    root = root or catalog.repo_root()
    if not names and not all_skills:
        raise SkillbookError("name the skills to install, or pass --all")
    found = [s for s in catalog.load_all(root) if s.skill_md.is_file()] if all_skills else []  # no half-made folders
    skills = found + [catalog.find(n, root) for n in dict.fromkeys(names) if n not in {s.folder for s in found}]
    if not skills:
        raise SkillbookError(f"no skills found under {root / 'skills'}")
    to = Path(to)
    plan = [(s.path, to / s.folder, skill_files(s.path)) for s in skills]
    for src, target, files in plan:  # the destination is the skill's own folder name, one level inside --to
        if not NAME_RE.match(target.name) or target.parent.resolve() != to.resolve():
            raise SkillbookError(f"refusing to install into {target}: it is not a skill folder directly inside {to}")
        escaped = [] if link or target.is_symlink() else [r for r in files if not _inside(target / r, target)]
        if escaped:  # checked before anything is written; _write_copy checks again as a backstop
            raise SkillbookError(f"refusing to write {target / escaped[0]}: it resolves outside {target} (a symlink?)")
        if not target.is_symlink() and target.resolve() == src.resolve():
            raise SkillbookError(
                f"{target} is the skill's own folder; install into an agent's skills directory instead"
            )
    conflicts = [c for src, target, files in plan for c in _conflicts(target, files, replace_dir=link)]
    if conflicts and not force:
        shown = "\n  ".join(conflicts[:20]) + (f"\n  … and {len(conflicts) - 20} more" if len(conflicts) > 20 else "")
        raise SkillbookError(
            f"refusing to overwrite {len(conflicts)} file(s) changed since they were installed:\n  {shown}\n"
            "re-run with --force to overwrite them (those changes are lost), or move them aside first"
        )
    to.mkdir(parents=True, exist_ok=True)
    results = []
    for src, target, files in plan:
        action = _write_link(src, target) if link else _write_copy(src, target, files)
        results.append({"skill": target.name, "path": str(target), "action": action, "files": len(files)})
    return results
