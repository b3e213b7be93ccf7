"""Rendering one page of the docs site: links mapped to site URLs, Markdown to HTML, templates to files.

Every relative link is resolved against the file it was written in and mapped to its page on the site;
one that cannot resolve is recorded with the file and line it came from. Linked files that are not pages
of their own (sources, other Markdown, images) are queued in `extra` for the build to write later.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from skillbook import catalog
from skillbook.site import data as site_data
from skillbook.site import links as site_links
from skillbook.site.markdown import Doc, parser

STAGE_TITLES = {
    "data": "Data",
    "pretraining": "Pretraining",
    "post-training": "Post-training",
    "architecture": "Architecture",
    "efficiency": "Efficiency",
    "deployment": "Deployment",
    "evaluation": "Evaluation",
    "other": "Other",
}


def site_dir(root: Path) -> Path:
    """Templates and static assets: the repository's site/, else the one next to this package."""
    own = root / "site"
    return own if (own / "templates").is_dir() else Path(__file__).resolve().parents[3] / "site"


class Renderer:
    """Renders pages into `out`, collecting link problems with the file and line they come from."""

    def __init__(self, root: Path, out: Path):
        self.root, self.out = root.resolve(), out
        self.skills = {s.folder: s for s in catalog.load_all(self.root)}
        self.pipelines = site_data.load_pipelines(self.root)
        self.errors: list[str] = []
        self.origins: dict[tuple[str, str], str] = {}
        self.reported: set[tuple[str, str]] = set()  # (page, href) already reported with file:line
        self.extra: dict[str, tuple[str, Path]] = {}  # site path -> (kind, source) still to write
        self.written: list[str] = []
        self.assets = site_dir(self.root)
        import jinja2

        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(self.assets / "templates"),
            autoescape=jinja2.select_autoescape(["j2", "html"]),
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
        )

    # -- links ---------------------------------------------------------------------------------

    def link(self, href: str, src: Path, line: int, page: str) -> str:
        """The site URL for a link written in `src`; a link that cannot resolve is recorded as an error."""
        where = f"{self.source_rel(src)}:{line}: link '{href}'"
        if site_links.is_external(href):
            return href
        self.reported.add((page, href))  # until it resolves below
        path, _, frag = (unquote(part) for part in href.partition("#"))  # markdown-it percent-encodes
        if not path:  # in-page anchor: the checker looks it up in the written page
            self.reported.discard((page, href))
            self.origins[(page, href)] = where
            return href
        target = Path(os.path.normpath(src.parent / path))
        try:
            rel_path = target.relative_to(self.root).as_posix()
        except ValueError:
            self.errors.append(f"{where}: points outside the repository")
            return href
        if not site_links.exists_case_sensitive(self.root, rel_path):
            self.errors.append(f"{where}: {rel_path} does not exist (paths are case-sensitive)")
            return href
        size = target.stat().st_size if target.is_file() else 0
        dest = site_links.site_target(rel_path, set(self.skills), set(self.pipelines), target.is_dir(), size)
        if isinstance(dest, str):
            self.errors.append(f"{where}: {dest}")
            return href
        if dest.kind != "page":
            self.extra.setdefault(dest.page, (dest.kind, target))
        url = site_links.rel(page, dest.page + (f"#{frag}" if frag else ""))
        self.reported.discard((page, href))
        self.origins[(page, url)] = where
        return url

    def source_rel(self, path: Path) -> str:
        """`path` relative to the repository (as written in error messages and "source" links)."""
        try:
            return path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def render_md(self, doc: Doc, page: str) -> str:
        """Rewrite the doc's links for `page` (line numbers from the source file), then render HTML."""
        for tok in doc.tokens:
            if tok.type != "inline" or not tok.children:
                continue
            line = (tok.map[0] if tok.map else 0) + doc.first_line
            for child in tok.children:
                if child.type in ("softbreak", "hardbreak"):
                    line += 1
                attr = "href" if child.type == "link_open" else "src" if child.type == "image" else None
                if attr and child.attrGet(attr) is not None:
                    child.attrSet(attr, self.link(str(child.attrGet(attr)), doc.path, line, page))
        return parser().renderer.render(doc.tokens, parser().options, {})

    # -- pages ---------------------------------------------------------------------------------

    def write(self, page: str, template: str, **ctx: Any) -> None:
        """Render one template to `page` with the shared context (nav, relative URL helper)."""
        from markupsafe import Markup

        def url(target: str) -> str:
            return site_links.rel(page, target)

        ctx = {
            "page": page,
            "url": url,
            "nav": self.nav,
            "pipelines": self.pipelines,
            "title": "",
            "toc": [],
            "Markup": Markup,
            **ctx,
        }
        html = self.env.get_template(template).render(**ctx)
        dest = self.out / page
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(html, encoding="utf-8")
        self.written.append(page)

    @cached_property
    def nav(self) -> list[tuple[str, str, list]]:
        """Skills grouped by lifecycle stage, in the catalog's stage order (unknown stages last)."""
        groups: dict[str, list] = {}
        for s in self.skills.values():
            groups.setdefault(s.stage, []).append(s)
        known = [st for st in catalog.STAGES if st != "other"]
        order = [*known, *sorted(set(groups) - set(catalog.STAGES)), "other"]  # "other" always last
        return [
            (st, STAGE_TITLES.get(st, st.replace("-", " ").capitalize()), groups[st]) for st in order if st in groups
        ]
