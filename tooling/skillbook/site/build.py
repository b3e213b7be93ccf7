"""`skills site build`: the static docs site, rendered from skills/, recipes/ and CONTRIBUTING.md.

Markdown goes through markdown-it-py (tables, heading anchors, pygments highlighting), pages through
jinja2 templates in site/templates, and every relative link is mapped to its page on the site. A link
that cannot resolve, or an anchor that does not exist once the site is written, fails the build with
the file and line it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import cached_property
from pathlib import Path
from urllib.parse import unquote

from skillbook import catalog
from skillbook.errors import SkillbookError
from skillbook.site import data as site_data
from skillbook.site import links as site_links
from skillbook.site import markdown as site_md
from skillbook.site.markdown import Doc, highlight, parse_doc, parser, slugify  # noqa: F401 (slugify: public API)

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
MARKER = ".skillbook-site"  # marks a folder as a built site, so a rebuild may wipe it


# ---------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------


def site_dir(root: Path) -> Path:
    """Templates and static assets: the repository's site/, else the one next to this package."""
    own = root / "site"
    return own if (own / "templates").is_dir() else Path(__file__).resolve().parents[3] / "site"


class Builder:
    """Renders every page into `out`, collecting link problems with the file and line they come from."""

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

    def link(self, href: str, src: Path, line: int, page: str, doc: Doc | None) -> str:
        """The site URL for a link written in `src`; a link that cannot resolve is recorded as an error."""
        where = f"{self._rel(src)}:{line}: link '{href}'"
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

    def _rel(self, path: Path) -> str:
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
                    child.attrSet(attr, self.link(str(child.attrGet(attr)), doc.path, line, page, doc))
        return parser().renderer.render(doc.tokens, parser().options, {})

    # -- pages ---------------------------------------------------------------------------------

    def write(self, page: str, template: str, **ctx) -> None:
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

    def skill_pages(self) -> list[dict]:
        """SKILL.md and its references for every skill; returns the search-index entries."""
        from markupsafe import Markup

        entries = []
        for name, skill in self.skills.items():
            page = f"skills/{name}/index.html"
            doc = parse_doc(skill.skill_md, skill.body, skill.body_line, taken=set(site_data.SKILL_SECTION_IDS))
            refs = []
            for ref in skill.references:
                text, problem = catalog.read_text(ref)
                if problem:
                    self.errors.append(f"{self._rel(ref)}:0: {problem}")
                    continue
                rdoc = parse_doc(ref, text)
                refs.append(
                    {
                        "name": ref.name,
                        "title": rdoc.title or ref.stem,
                        "doc": rdoc,
                        "summary": site_data.first_paragraph(text),
                        "page": f"skills/{name}/references/{ref.stem}.html",
                    }
                )
            for i, r in enumerate(refs):  # each reference page links back to its skill and on to its siblings
                body = Markup(self.render_md(r["doc"], r["page"]))
                self.write(
                    r["page"],
                    "doc.html.j2",
                    title=f"{r['title']} · {name}",
                    heading=None,
                    body=body,
                    toc=r["doc"].toc,
                    crumbs=[(f"skills/{name}/index.html", name)],
                    source=self._rel(r["doc"].path),
                    active=name,
                    prev=refs[i - 1] if i else None,
                    next=refs[i + 1] if i + 1 < len(refs) else None,
                    up=(f"skills/{name}/index.html", name),
                )
                entries.append(
                    site_data.entry(
                        "reference",
                        f"{name}: {r['title']}",
                        r["doc"].title,
                        r["summary"],
                        r["page"],
                        r["doc"].toc,
                        skill.stage,
                    )
                )
            body = Markup(self.render_md(doc, page))
            facts = site_data.skill_facts(skill, self.root, self.pipelines)
            for kind_path in facts["sources"]:
                self.extra.setdefault(f"files/{kind_path}.html", ("source", self.root / kind_path))
            if skill.skill_md.is_file():
                self.extra.setdefault(facts["raw"], ("copy", skill.skill_md))
            for src, dest in facts["copies"]:
                self.extra.setdefault(dest, ("copy", src))
            default_yaml = skill.path / "recipe.yaml"
            facts["default_yaml"] = (
                Markup(highlight(default_yaml.read_text(encoding="utf-8"), "yaml")) if default_yaml.is_file() else None
            )
            for preset in facts["presets"]:
                preset["yaml"] = Markup(highlight(preset["text"], "yaml"))
            self.write(
                page,
                "skill.html.j2",
                title=skill.name,
                skill=skill,
                body=body,
                refs=refs,
                toc=[*doc.toc, *site_data.skill_toc(facts)],
                facts=facts,
                active=name,
                stage_title=STAGE_TITLES.get(skill.stage, skill.stage),
            )
            entries.append(
                site_data.entry("skill", skill.name, doc.title, skill.description, page, doc.toc, skill.stage)
            )
        return entries

    def pipeline_pages(self) -> list[dict]:
        from markupsafe import Markup

        from skillbook.site import graph as site_graph

        entries = []
        for name, spec in self.pipelines.items():
            page = f"pipelines/{name}.html"
            rel = f"recipes/{name}.yaml"
            for step in spec["steps"]:
                if step["skill"] not in self.skills:
                    self.errors.append(
                        f"{rel}:{step.get('line', 0)}: step '{step['id']}' uses unknown skill '{step['skill']}'"
                    )

            def href(step: dict) -> str | None:
                return f"../skills/{step['skill']}/index.html" if step["skill"] in self.skills else None

            graph = Markup(site_graph.svg(spec["steps"], href, title=f"step graph of {name}"))
            source = Markup(highlight((self.root / rel).read_text(encoding="utf-8"), "yaml"))
            self.write(
                page,
                "pipeline.html.j2",
                title=name,
                spec=spec,
                graph=graph,
                source=source,
                active=f"p:{name}",
                toc=[
                    (2, "Step graph", "graph"),
                    (2, "Steps", "steps"),
                    (2, "Run it", "run"),
                    (2, "Pipeline file", "file"),
                ],
                skills=self.skills,
            )
            entries.append(site_data.entry("pipeline", name, name, spec["description"], page, [], "pipeline"))
        return entries

    def extra_pages(self) -> None:
        """Source files, other Markdown and images that Markdown linked to (they may link on)."""
        from markupsafe import Markup

        done: set[str] = set()
        while set(self.extra) - done:
            page = sorted(set(self.extra) - done)[0]
            done.add(page)
            kind, src = self.extra[page]
            dest = self.out / page
            dest.parent.mkdir(parents=True, exist_ok=True)
            rel = self._rel(src)
            if kind == "copy":
                shutil.copyfile(src, dest)
                continue
            text, problem = catalog.read_text(src)
            if problem:
                self.errors.append(f"{rel}:0: {problem}")
                continue
            if kind == "markdown":
                doc = parse_doc(src, text)
                body = Markup(self.render_md(doc, page))
                self.write(
                    page,
                    "doc.html.j2",
                    title=doc.title or rel,
                    heading=None,
                    body=body,
                    toc=doc.toc,
                    crumbs=[],
                    source=rel,
                    active="",
                )
            else:
                self.write(
                    page,
                    "source.html.j2",
                    title=rel,
                    rel=rel,
                    active="",
                    source=rel,
                    lines=Markup(site_data.source_lines(text, src.suffix.lstrip("."), highlight)),
                )

    def build(self) -> dict:
        from markupsafe import Markup

        t0 = time.perf_counter()
        entries = self.skill_pages() + self.pipeline_pages()
        contributing = self.root / "CONTRIBUTING.md"
        if contributing.is_file():
            doc = parse_doc(contributing, contributing.read_text(encoding="utf-8"))
            self.write(
                "contributing.html",
                "doc.html.j2",
                title="Contributing",
                heading=None,
                toc=doc.toc,
                crumbs=[],
                body=Markup(self.render_md(doc, "contributing.html")),
                source="CONTRIBUTING.md",
                active="contributing",
            )
        else:
            self.write(
                "contributing.html",
                "contributing.html.j2",
                title="Contributing",
                active="contributing",
                toc=[(2, "Add a skill", "add-a-skill"), (2, "Checks", "checks")],
            )
        entries.append(
            site_data.entry(
                "page", "Contributing", "Contributing", "How to add or improve a skill", "contributing.html", [], "page"
            )
        )
        self.write("index.html", "home.html.j2", title="", active="home")
        self.write("search.html", "search.html.j2", title="Search", active="search")
        catalog_files = site_data.agent_catalog(self.root)
        for fname, text in catalog_files.items():
            (self.out / "catalog").mkdir(parents=True, exist_ok=True)
            (self.out / "catalog" / fname).write_text(text, encoding="utf-8")
        shown = {name: Markup(highlight(text, name.rsplit(".", 1)[1])) for name, text in catalog_files.items()}
        self.write(
            "catalog.html",
            "catalog.html.j2",
            title="Agent catalog",
            active="catalog",
            files=shown,
            toc=[(2, "XML", "xml"), (2, "JSON", "json")],
        )
        self.extra_pages()
        index = json.dumps({"entries": entries}, ensure_ascii=False, separators=(",", ":"))
        (self.out / "search-index.json").write_text(index, encoding="utf-8")
        (self.out / "static").mkdir(exist_ok=True)
        (self.out / "static" / "search-index.js").write_text(f"window.SKILLBOOK_INDEX={index};\n", encoding="utf-8")
        for asset in sorted((self.assets / "static").iterdir()):
            if asset.is_file():
                shutil.copyfile(asset, self.out / "static" / asset.name)
        for broken in site_links.check(self.out, self.origins):
            if (broken.page, broken.href) not in self.reported:
                self.errors.append(str(broken))
        if self.errors:
            shown = "\n  ".join(self.errors[:40])
            more = f"\n  … and {len(self.errors) - 40} more" if len(self.errors) > 40 else ""
            raise SkillbookError(f"site build failed: {len(self.errors)} problem(s):\n  {shown}{more}")
        return {
            "out": str(self.out),
            "pages": len(self.written),
            "skills": len(self.skills),
            "pipelines": len(self.pipelines),
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


def build(out: Path | None = None, root: Path | None = None) -> dict:
    """Build the site into `out` (default <root>/build/site); returns page counts and the time taken."""
    t0 = time.perf_counter()
    root = (root or catalog.repo_root()).resolve()
    out = Path(out or root / "build" / "site").resolve()
    _prepare(out)
    cache = root / ".skillbook-cache" / "site-highlight.json"
    site_md.load_cache(cache)
    result = Builder(root, out).build()
    site_md.save_cache(cache)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def serve(out: Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve a built site on http://host:port until interrupted."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(out))
    with ThreadingHTTPServer((host, port), handler) as httpd:
        httpd.serve_forever()
