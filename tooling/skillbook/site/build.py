"""`skills site build`: the static docs site, rendered from skills/, recipes/ and CONTRIBUTING.md.

Markdown goes through markdown-it-py (tables, heading anchors, pygments highlighting), pages through
jinja2 templates in site/templates, and every relative link is mapped to its page on the site. A link
that cannot resolve, or an anchor that does not exist once the site is written, fails the build with
the file and line it came from. This module is the driver: it prepares the output folder, has
`site.pages` write every page through one `site.render.Renderer`, then writes the search index and the
static assets and checks every link of the written site.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from skillbook import catalog
from skillbook.errors import SkillbookError
from skillbook.site import links as site_links
from skillbook.site import markdown as site_md
from skillbook.site import pages
from skillbook.site.render import Renderer

MARKER = ".skillbook-site"  # marks a folder as a built site, so a rebuild may wipe it


def build(out: Path | None = None, root: Path | None = None) -> dict:
    """Build the site into `out` (default <root>/build/site); returns page counts and the time taken."""
    t0 = time.perf_counter()
    root = (root or catalog.repo_root()).resolve()
    out = Path(out or root / "build" / "site").resolve()
    _prepare(out)
    cache = root / ".skillbook-cache" / "site-highlight.json"
    site_md.load_cache(cache)
    r = Renderer(root, out)
    _write_site(r)
    site_md.save_cache(cache)
    return {
        "out": str(r.out),
        "pages": len(r.written),
        "skills": len(r.skills),
        "pipelines": len(r.pipelines),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _prepare(out: Path) -> None:
    """Empty `out` if it is a previous build (or empty); refuse to wipe anything else."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists()):
            raise SkillbookError(f"{out} exists and is not a Skillbook site build; pick another --out or remove it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("built by `skills site build`; the next build replaces this folder\n")


def _write_site(r: Renderer) -> None:
    """Every page, then the files they linked to, the search index and assets; fail on any problem."""
    entries = pages.skill_pages(r) + pages.pipeline_pages(r)
    entries.append(pages.contributing_page(r))
    pages.home_and_search_pages(r)
    pages.catalog_page(r)
    pages.support_page(r)
    pages.extra_pages(r)  # last: every page before may have queued linked files
    _write_search_index(r.out, entries, r.root)
    _copy_static(r.assets / "static", r.out / "static")
    for broken in site_links.check(r.out, r.origins):
        if (broken.page, broken.href) not in r.reported:
            r.errors.append(str(broken))
    if r.errors:
        shown = "\n  ".join(r.errors[:40])
        more = f"\n  … and {len(r.errors) - 40} more" if len(r.errors) > 40 else ""
        raise SkillbookError(f"site build failed: {len(r.errors)} problem(s):\n  {shown}{more}")


def _write_search_index(out: Path, entries: list[dict], root: Path) -> None:
    """search-index.json, and the same as a script (the search page loads it with a script tag, no fetch):
    the page entries, and `skills search`'s BM25 ranking (its exported weights) for whole requests."""
    from skillbook.catalog import search

    ranking = search.build(root).export()
    index = json.dumps({"entries": entries, "ranking": ranking}, ensure_ascii=False, separators=(",", ":"))
    (out / "search-index.json").write_text(index, encoding="utf-8")
    (out / "static").mkdir(exist_ok=True)
    (out / "static" / "search-index.js").write_text(f"window.SKILLBOOK_INDEX={index};\n", encoding="utf-8")


def _copy_static(src: Path, dest: Path) -> None:
    for asset in sorted(src.iterdir()):
        if asset.is_file():
            shutil.copyfile(asset, dest / asset.name)


def serve(out: Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve a built site on http://host:port until interrupted."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(out))
    with ThreadingHTTPServer((host, port), handler) as httpd:
        httpd.serve_forever()
