"""`skills prompt`: the <available_skills> catalog agents load at start-up, within a token budget."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from skillbook import catalog


def _entry_xml(s: dict, description: str) -> str:
    return (
        f"<skill>\n<name>{escape(s['name'])}</name>\n<description>{escape(description)}</description>\n"
        f"<location>{escape(s['skill_md'])}</location>\n</skill>"
    )


def estimate_tokens(text: str) -> int:
    """~4 characters per token: the usual rule of thumb for English with BPE vocabularies."""
    return (len(text) + 3) // 4


def prompt(fmt: str = "xml", max_tokens: int | None = None, root: Path | None = None) -> str:
    """The catalog as XML or JSON. Over budget: shorten descriptions to their first sentence, then drop entries."""
    skills = catalog.index(root)["skills"]
    descs = [s["description"] for s in skills]

    def render(items: list[tuple[dict, str]], note: str = "") -> str:
        if fmt == "json":
            body: dict[str, object] = {
                "available_skills": [{"name": s["name"], "description": d, "location": s["skill_md"]} for s, d in items]
            }
            if note:
                body["note"] = note
            return json.dumps(body, indent=2)
        inner = "\n".join(_entry_xml(s, d) for s, d in items)
        text = f"<available_skills>\n{inner}\n</available_skills>"
        return f"{text}\n<!-- {note} -->" if note else text

    items = list(zip(skills, descs))
    text = render(items)
    if max_tokens is None or estimate_tokens(text) <= max_tokens:
        return text
    short = [(s, d.split(". ")[0].rstrip(".") + ".") for s, d in items]
    note = f"descriptions shortened to fit {max_tokens} tokens; run `skills show NAME` for the full text"
    text = render(short, note)
    while estimate_tokens(text) > max_tokens and short:
        short = short[:-1]
        dropped = len(items) - len(short)
        note = (
            f"descriptions shortened and {dropped} skill(s) dropped to fit {max_tokens} tokens; "
            f"run `skills list` for all {len(items)}"
        )
        text = render(short, note)
    return text
