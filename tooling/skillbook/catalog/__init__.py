"""The catalog: skills found on disk, their frontmatter and markdown facts, code blocks and tested-with versions.

The index API (`load_all`, `find`, `Skill`, …) lives in `catalog.skills` and is re-exported here, so callers
write `catalog.find(name)`.
"""

from skillbook.catalog.skills import (
    STAGES,
    Skill,
    find,
    index,
    load_all,
    load_skill,
    pipeline_files,
    read_text,
    repo_root,
    skill_dirs,
    write_index,
)

__all__ = [
    "STAGES",
    "Skill",
    "find",
    "index",
    "load_all",
    "load_skill",
    "pipeline_files",
    "read_text",
    "repo_root",
    "skill_dirs",
    "write_index",
]
