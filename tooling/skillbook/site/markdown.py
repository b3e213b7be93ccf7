"""Markdown for the docs site: one cached markdown-it parser, pygments highlighting, GitHub-style heading ids."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from html import escape
from pathlib import Path

FENCE_NOTES = {
    "fragment": "fragment, not run",
    "gpu": "needs a GPU, not run in CI",
    "hub": "needs the Hub, not run in CI",
    "slow": "slow, not run in CI",
    "no-run": "not run",
}


def slugify(text: str) -> str:
    """GitHub's heading anchors: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-") or "section"


@lru_cache(maxsize=64)
def _lexer(lang: str):
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    try:  # stripnl=False keeps leading blank lines, so source-page line numbers match the file
        return get_lexer_by_name({"console": "bash", "shell": "bash", "jsonl": "json"}.get(lang, lang), stripnl=False)
    except ClassNotFound:
        return None


@lru_cache(maxsize=512)
def _css_class(ttype) -> str:
    from pygments.token import STANDARD_TYPES

    while ttype not in STANDARD_TYPES:
        ttype = ttype.parent
    return STANDARD_TYPES[ttype]


# Highlighted HTML by hash of (language, code): lexing is the costliest step of a build, and most code
# does not change between builds. Kept in memory for the process and on disk between builds.
_CACHE: dict[str, str] = {}
_USED: set[str] = set()
CACHE_VERSION = "1"  # bump when _pygmentize's output changes


def highlight(code: str, lang: str) -> str:
    """Highlighted HTML for `code` (cached; see _pygmentize)."""
    key = hashlib.blake2b(f"{lang}\0{code}".encode(), digest_size=16).hexdigest()
    html = _CACHE.get(key)
    if html is None:
        html = _CACHE[key] = _pygmentize(code, lang)
    _USED.add(key)
    return html


def _pygmentize(code: str, lang: str) -> str:
    """Pygments tokens as `<span class="k">` (pygments' short names, styled by style.css in both themes).

    A small formatter of our own: every span closes on the line it opens, so source pages can wrap
    each line in an element carrying its `#L<n>` anchor.
    """
    lexer = _lexer(lang.lower()) if lang else None
    if lexer is None:
        return escape(code, quote=False)
    out = []
    for ttype, value in lexer.get_tokens(code):
        cls, text = _css_class(ttype), escape(value, quote=False)
        if cls and value.strip():
            text = "\n".join(f'<span class="{cls}">{part}</span>' if part else "" for part in text.split("\n"))
        out.append(text)
    html = "".join(out)
    return html[:-1] if html.endswith("\n") and not code.endswith("\n") else html


def _cache_tag() -> str:
    import pygments

    return f"{CACHE_VERSION}-pygments-{pygments.__version__}"


def load_cache(path: Path) -> None:
    """Read highlighted snippets a previous build saved (a missing or stale file is simply ignored)."""
    _USED.clear()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("tag") == _cache_tag() and isinstance(data.get("html"), dict):
        for key, html in data["html"].items():
            _CACHE.setdefault(key, html)


def save_cache(path: Path) -> None:
    """Keep the snippets this build used, so the file never grows past one build's worth."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tag": _cache_tag(), "html": {k: _CACHE[k] for k in _USED}}), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only checkout still builds, only without the cache


def _fence(self, tokens, idx, options, env) -> str:
    tok = tokens[idx]
    words = tok.info.split()
    lang, flags = (words[0], words[1:]) if words else ("", [])
    notes = [FENCE_NOTES.get(f, f) for f in flags]
    cap = escape(" · ".join([lang, *notes])) if lang else ""
    head = f'<div class="code-head"><span>{cap}</span></div>' if cap else ""
    return f'<div class="code">{head}<pre class="highlight"><code>{highlight(tok.content, lang)}</code></pre></div>\n'


def _heading_close(self, tokens, idx, options, env) -> str:
    hid = tokens[idx].meta.get("id")
    link = f'<a class="anchor" href="#{escape(hid)}" aria-label="link to this section">#</a>' if hid else ""
    return f"{link}</{tokens[idx].tag}>\n"


@lru_cache(maxsize=1)
def parser():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    md.add_render_rule("fence", _fence)
    md.add_render_rule("heading_close", _heading_close)
    md.add_render_rule("table_open", lambda self, t, i, o, e: '<div class="table-wrap"><table>\n')
    md.add_render_rule("table_close", lambda self, t, i, o, e: "</table></div>\n")
    return md


def _inline_text(tok) -> str:
    return "".join(c.content for c in tok.children or [] if c.type in ("text", "code_inline"))


@dataclass
class Doc:
    """A parsed Markdown file: tokens with heading ids set, its table of contents and title."""

    path: Path
    first_line: int
    tokens: list
    toc: list[tuple[int, str, str]] = field(default_factory=list)  # (level, text, id)
    title: str = ""


def parse_doc(path: Path, text: str, first_line: int = 1, taken: set[str] | None = None) -> Doc:
    """Parse once; give every heading a unique slug id (the same function the checker trusts)."""
    tokens = parser().parse(text)
    doc, seen = Doc(path, first_line, tokens), dict.fromkeys(taken or (), 0)
    for i, tok in enumerate(tokens):
        if tok.type != "heading_open":
            continue
        text_ = _inline_text(tokens[i + 1])
        base = slugify(text_)
        hid = base if base not in seen else f"{base}-{seen[base] + 1}"
        seen[base] = seen.get(base, -1) + 1
        seen.setdefault(hid, 0)
        tok.attrSet("id", hid)
        tokens[i + 2].meta = {**(tokens[i + 2].meta or {}), "id": hid}
        level = int(tok.tag[1])
        if level == 1 and not doc.title:
            doc.title = text_
        elif level in (2, 3):
            doc.toc.append((level, text_, hid))
    return doc
