"""Links of the docs site: repository file -> site page, and the checker that walks the built output."""

from __future__ import annotations

import html
import posixpath
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
MAX_SOURCE_BYTES = 256_000  # bigger files are copied as they are instead of rendered as a source page
_EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//)")
_ID_RE = re.compile(r"""\s(?:id|name)\s*=\s*"([^"]*)\"""")
_REF_RE = re.compile(r"""\s(?:href|src|xlink:href)\s*=\s*"([^"]*)\"""")


def is_external(href: str) -> bool:
    """URLs with a scheme (https:, mailto:, data:) or protocol-relative ones leave the site."""
    return bool(_EXTERNAL.match(href))


@lru_cache(maxsize=65536)  # every page links every skill in its nav: thousands of identical calls
def rel(page: str, target: str) -> str:
    """The relative URL from site page `page` to site path `target` (which may carry #anchor)."""
    path, _, frag = target.partition("#")
    if not path:
        return f"#{frag}" if frag else "#"
    out = posixpath.relpath(path, posixpath.dirname(page) or ".")
    return f"{out}#{frag}" if frag else out


def exists_case_sensitive(root: Path, rel_path: str) -> bool:
    """True when every part of rel_path exists under root with exactly that spelling."""
    path = root
    for part in Path(rel_path).parts:
        try:
            names = {p.name for p in path.iterdir()}
        except OSError:
            return False
        if part not in names:
            return False
        path = path / part
    return True


@dataclass
class Target:
    """Where a repository file lives on the site; `kind` says how the builder produces it."""

    page: str  # site path, relative to the output folder
    kind: str  # "page" (rendered by the builder anyway), "markdown", "source", "copy"


def site_target(rel_path: str, skills: set[str], pipelines: set[str], is_dir: bool, size: int) -> Target | str:
    """Map a repository-relative path to its site path, or return why it cannot be shown."""
    parts = rel_path.split("/")
    suffix = posixpath.splitext(rel_path)[1].lower()
    if is_dir:
        if parts[0] == "skills" and len(parts) == 2 and parts[1] in skills:
            return Target(f"skills/{parts[1]}/index.html", "page")
        return "links to a folder; link a file inside it instead"
    if parts[0] == "skills" and len(parts) >= 3 and parts[1] in skills:
        if parts[2:] == ["SKILL.md"]:
            return Target(f"skills/{parts[1]}/index.html", "page")
        if len(parts) == 4 and parts[2] == "references" and suffix == ".md":
            return Target(f"skills/{parts[1]}/references/{parts[3][:-3]}.html", "page")
    if len(parts) == 2 and parts[0] == "recipes" and suffix == ".yaml" and parts[1][:-5] in pipelines:
        return Target(f"pipelines/{parts[1][:-5]}.html", "page")
    if rel_path == "CONTRIBUTING.md":
        return Target("contributing.html", "page")
    if rel_path == "README.md":
        return Target("index.html", "page")
    if suffix in IMAGE_SUFFIXES or size > MAX_SOURCE_BYTES:
        return Target(f"files/{rel_path}", "copy")
    return Target(f"files/{rel_path}.html", "markdown" if suffix == ".md" else "source")


# ---------------------------------------------------------------------------------------------
# The checker: every internal href/src in the output points at a file, and every #anchor at an id
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    page: str
    href: str
    reason: str
    origin: str = ""  # "file:line: link 'x'" when the link came from Markdown

    def __str__(self) -> str:
        where = self.origin or f"{self.page}: href '{self.href}'"
        return f"{where}: {self.reason}"


def _scan(text: str) -> tuple[set[str], list[str]]:
    ids = {html.unescape(m) for m in _ID_RE.findall(text)}
    return ids, [html.unescape(m) for m in _REF_RE.findall(text)]


def check(out: Path, origins: dict[tuple[str, str], str] | None = None) -> list[Broken]:
    """Walk every HTML page under `out`; return the links and anchors that do not resolve."""
    origins = origins or {}
    pages: dict[str, tuple[set[str], list[str]]] = {}
    for html_file in sorted(out.rglob("*.html")):
        pages[html_file.relative_to(out).as_posix()] = _scan(html_file.read_text(encoding="utf-8"))
    broken: list[Broken] = []
    for page, (_ids, hrefs) in pages.items():
        for href in hrefs:
            if not href or is_external(href):
                continue
            path, _, frag = (unquote(part) for part in href.partition("#"))
            path = path.split("?", 1)[0]
            if path:
                target = posixpath.normpath(posixpath.join(posixpath.dirname(page), path))
                if target.startswith("../") or target == "..":
                    broken.append(Broken(page, href, "points outside the site", origins.get((page, href), "")))
                    continue
                if (out / target).is_dir():
                    target = posixpath.join(target, "index.html")
                if not (out / target).is_file():
                    broken.append(Broken(page, href, f"{target} does not exist", origins.get((page, href), "")))
                    continue
            else:
                target = page
            if frag and target.endswith(".html") and frag not in pages.get(target, (set(), []))[0]:
                broken.append(Broken(page, href, f"no anchor #{frag} in {target}", origins.get((page, href), "")))
    return broken
