"""`.claude-plugin/marketplace.json`, generated from the catalog (lint checks it for drift)."""

from __future__ import annotations

import json
from pathlib import Path

from skillbook import catalog

MARKETPLACE = Path(".claude-plugin") / "marketplace.json"


def marketplace(root: Path | None = None) -> dict:
    """One Claude Code plugin, 'skillbook', holding every skill (they link to and build on each other)."""
    root = root or catalog.repo_root()
    skills = [s for s in catalog.load_all(root) if s.skill_md.is_file()]
    stages = [st for st in catalog.STAGES if any(s.stage == st for s in skills)]
    description = (
        f"{len(skills)} LLM research skills with runnable CPU-tiny recipes"
        + (f" ({', '.join(stages)})" if stages else "")
        + ": read the SKILL.md, then `skills run NAME`."
    )
    return {
        "name": "skillbook",
        "owner": {"name": "Skillbook contributors"},
        "metadata": {"description": "Executable knowledge library of LLM research skills"},
        "plugins": [
            {
                "name": "skillbook",
                "description": description,
                "source": "./",
                "strict": False,
                "skills": [f"./skills/{s.folder}" for s in skills],
            }
        ],
    }


def marketplace_text(root: Path | None = None) -> str:
    return json.dumps(marketplace(root), indent=2) + "\n"


def write_marketplace(root: Path | None = None) -> Path:
    root = root or catalog.repo_root()
    path = root / MARKETPLACE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(marketplace_text(root))
    return path


def marketplace_drift(root: Path | None = None) -> list[str]:
    """Why the checked-in marketplace.json differs from the catalog ([] when it matches)."""
    root = root or catalog.repo_root()
    path = root / MARKETPLACE
    fix = "run `skills marketplace` and commit .claude-plugin/marketplace.json"
    if not path.is_file():
        return [f"{MARKETPLACE} is missing; {fix}"]
    try:
        have = json.loads(path.read_text())
    except ValueError as exc:
        return [f"{MARKETPLACE} is not valid JSON ({exc}); {fix}"]
    want = marketplace(root)
    if have == want:
        return []
    plugins = have.get("plugins") if isinstance(have, dict) else None
    first = plugins[0] if isinstance(plugins, list) and plugins and isinstance(plugins[0], dict) else {}
    listed = set(first.get("skills") or [])
    wanted = set(want["plugins"][0]["skills"])
    parts = [
        f"missing {sorted(wanted - listed)}" if wanted - listed else "",
        f"extra {sorted(listed - wanted)}" if listed - wanted else "",
    ]
    detail = "; ".join(p for p in parts if p) or "fields differ"
    return [f"{MARKETPLACE} is out of date with skills/ ({detail}); {fix}"]
