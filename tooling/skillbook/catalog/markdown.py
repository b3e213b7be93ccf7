"""Markdown facts the catalog, lint and site need: code blocks, links, headings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from markdown_it import MarkdownIt


@dataclass(frozen=True)
class CodeBlock:
    """A fenced block: language, the rest of the info string, code, and its SKILL.md line."""

    lang: str
    flags: tuple[str, ...]
    code: str
    line: int  # 1-based line of the opening fence in the file


@dataclass(frozen=True)
class Link:
    target: str
    line: int


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    line: int


@lru_cache(maxsize=1)
def parser() -> MarkdownIt:
    return MarkdownIt("commonmark").enable("table")


def scan(text: str, first_line: int = 1) -> tuple[list[CodeBlock], list[Link], list[Heading]]:
    """Parse markdown once and return its code blocks, links and headings with file line numbers."""
    blocks: list[CodeBlock] = []
    links: list[Link] = []
    headings: list[Heading] = []
    tokens = parser().parse(text)
    for i, tok in enumerate(tokens):
        line = (tok.map[0] if tok.map else 0) + first_line
        if tok.type == "fence":
            words = tok.info.strip().split()
            blocks.append(CodeBlock(words[0] if words else "", tuple(words[1:]), tok.content, line))
        elif tok.type == "heading_open":
            headings.append(Heading(int(tok.tag[1]), tokens[i + 1].content, line))
        elif tok.type == "inline":
            for child in tok.children or []:
                if child.type == "link_open":
                    links.append(Link(str(child.attrGet("href") or ""), line))
                elif child.type == "image":
                    links.append(Link(str(child.attrGet("src") or ""), line))
    return blocks, links, headings


def is_relative(target: str) -> bool:
    """True for links into the repository (not URLs, mail or in-page anchors)."""
    return bool(target) and not target.startswith(("#", "http://", "https://", "mailto:", "//"))
