"""`skills prompt`: the <available_skills> catalog agents load at start-up, within a token budget.

The budget is a guarantee, not an estimate: tokens are counted with a conservative upper bound (the larger
of characters / 3 and words + punctuation marks; BPE vocabularies such as cl100k, Llama 3 and Qwen average
about 4 characters per English token), so the real count is lower with any of them. Over budget, each
description is shortened to its first clause plus its "Use when" clause (the words an agent chooses by),
then the least relevant entries are dropped (relevance to `--for REQUEST` by `skills search`'s ranking,
else catalog order), and the note names every dropped skill.
"""

from __future__ import annotations

import json
import math
import re
from html import escape
from pathlib import Path

from skillbook import catalog

COUNTING = "upper bound: max(chars/3, words + punctuation)"


def _entry_xml(s: dict, description: str) -> str:
    return (
        f"<skill>\n<name>{escape(s['name'])}</name>\n<description>{escape(description)}</description>\n"
        f"<location>{escape(s['skill_md'])}</location>\n</skill>"
    )


def estimate_tokens(text: str) -> int:
    """An upper bound on the tokens of `text` for common BPE vocabularies (see the module docstring)."""
    return max(math.ceil(len(text) / 3), len(re.findall(r"\w+|[^\w\s]", text)))


def shorten(description: str, what: int = 100, when: int = 160) -> str:
    """The first clause of the first sentence and the "Use when ..." sentence, each cut at a word boundary."""

    def cut(text: str, n: int) -> str:
        return text if len(text) <= n else text[:n].rsplit(" ", 1)[0].rstrip(",;:-") + "…"

    first = re.split(r" - |\. |; | \(", description, maxsplit=1)[0].rstrip(".")
    use = re.search(r"\bUse (?:it )?when\b[^.]*", description)
    return cut(first, what) + "." + (f" {cut(use.group(0), when)}." if use else "")


def relevance_order(skills: list[dict], request: str | None, root: Path | None) -> list[dict]:
    """The router first (it finds every other skill), then the skills most relevant to `request` (skills
    search's BM25 ranking), or catalog order without one."""
    from skillbook.catalog.search import ROUTER

    rank: dict[str, int] = {}
    if request:
        from skillbook.catalog import search

        hits = search.build(root).search(request, k=len(skills) + 50).hits
        rank = {h.name: i for i, h in enumerate(hits) if h.kind == "skill"}
    return sorted(skills, key=lambda s: (s["name"] != ROUTER, rank.get(s["name"], len(rank))))


def prompt(
    fmt: str = "xml", max_tokens: int | None = None, root: Path | None = None, request: str | None = None
) -> str:
    """The catalog as XML or JSON, within `max_tokens` (counted as an upper bound); relevance to `request`
    decides the order and, when entries must go, which go first."""
    skills = relevance_order(catalog.index(root)["skills"], request, root)

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

    items = [(s, s["description"]) for s in skills]
    text = render(items)
    if max_tokens is None or estimate_tokens(text) <= max_tokens:
        return text
    short = [(s, shorten(d)) for s, d in items]
    note = f"descriptions shortened to fit {max_tokens} tokens ({COUNTING}); `skills show NAME` has the full text"
    text = render(short, note)
    while estimate_tokens(text) > max_tokens and short:
        short = short[:-1]
        dropped = [s["name"] for s, _ in items[len(short) :]]
        order = "least relevant to the request" if request else "last in catalog order"
        note = (
            f"descriptions shortened and {len(dropped)} skill(s) dropped ({order}) to fit {max_tokens} tokens "
            f"({COUNTING}): {', '.join(dropped)}; `skills search REQUEST` finds any of them"
        )
        text = render(short, note)
    return text
