"""The pages of the docs site, one function per kind: skills and their references, pipelines, linked
files, contributing and the agent catalog. Each returns the search-index entries of what it wrote.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from skillbook import catalog
from skillbook.catalog.skills import Skill
from skillbook.site import data as site_data
from skillbook.site.markdown import Doc, highlight, parse_doc
from skillbook.site.render import STAGE_TITLES, Renderer

# ---------------------------------------------------------------------------------------------
# Skills and their references
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefPage:
    """One file of a skill's references/, parsed, with the page it is written to."""

    name: str
    title: str
    doc: Doc
    summary: str
    page: str


def skill_pages(r: Renderer) -> list[dict]:
    """SKILL.md and its references for every skill; returns the search-index entries."""
    entries = []
    for name, skill in r.skills.items():
        refs = _parse_references(r, skill)
        entries += _reference_pages(r, name, skill, refs)
        entries.append(_skill_page(r, name, skill, refs))
    return entries


def _parse_references(r: Renderer, skill: Skill) -> list[RefPage]:
    """The skill's reference files that read as text (the others are reported)."""
    refs = []
    for ref in skill.references:
        text, problem = catalog.read_text(ref)
        if problem:
            r.errors.append(f"{r.source_rel(ref)}:0: {problem}")
            continue
        rdoc = parse_doc(ref, text)
        refs.append(
            RefPage(
                name=ref.name,
                title=rdoc.title or ref.stem,
                doc=rdoc,
                summary=site_data.first_paragraph(text),
                page=f"skills/{skill.folder}/references/{ref.stem}.html",
            )
        )
    return refs


def _reference_pages(r: Renderer, name: str, skill: Skill, refs: list[RefPage]) -> list[dict]:
    """Each reference page links back to its skill and on to its siblings."""
    from markupsafe import Markup

    entries = []
    for i, ref in enumerate(refs):
        body = Markup(r.render_md(ref.doc, ref.page))
        r.write(
            ref.page,
            "doc.html.j2",
            title=f"{ref.title} · {name}",
            heading=None,
            body=body,
            toc=ref.doc.toc,
            crumbs=[(f"skills/{name}/index.html", name)],
            source=r.source_rel(ref.doc.path),
            active=name,
            prev=refs[i - 1] if i else None,
            next=refs[i + 1] if i + 1 < len(refs) else None,
            up=(f"skills/{name}/index.html", name),
        )
        entries.append(
            site_data.entry(
                "reference", f"{name}: {ref.title}", ref.doc.title, ref.summary, ref.page, ref.doc.toc, skill.stage
            )
        )
    return entries


def _skill_page(r: Renderer, name: str, skill: Skill, refs: list[RefPage]) -> dict:
    """The skill's own page: SKILL.md beside its config table, presets, references and results."""
    from markupsafe import Markup

    page = f"skills/{name}/index.html"
    doc = parse_doc(skill.skill_md, skill.body, skill.body_line, taken=set(site_data.SKILL_SECTION_IDS))
    body = Markup(r.render_md(doc, page))
    facts = _skill_facts(r, skill)
    r.write(
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
    return site_data.entry("skill", skill.name, doc.title, skill.description, page, doc.toc, skill.stage)


def _skill_facts(r: Renderer, skill: Skill) -> dict:
    """`site_data.skill_facts` with highlighted YAML; queues the files the page links to."""
    from markupsafe import Markup

    facts = site_data.skill_facts(skill, r.root, r.pipelines)
    for kind_path in facts["sources"]:
        r.extra.setdefault(f"files/{kind_path}.html", ("source", r.root / kind_path))
    if skill.skill_md.is_file():
        r.extra.setdefault(facts["raw"], ("copy", skill.skill_md))
    for src, dest in facts["copies"]:
        r.extra.setdefault(dest, ("copy", src))
    default_yaml = skill.path / "recipe.yaml"
    facts["default_yaml"] = (
        Markup(highlight(default_yaml.read_text(encoding="utf-8"), "yaml")) if default_yaml.is_file() else None
    )
    for preset in facts["presets"]:
        preset["yaml"] = Markup(highlight(preset["text"], "yaml"))
    return facts


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def pipeline_pages(r: Renderer) -> list[dict]:
    """One page per recipes/*.yaml: its step graph, steps and source; unknown skills are reported."""
    from markupsafe import Markup

    from skillbook.site import graph as site_graph

    entries = []
    for name, spec in r.pipelines.items():
        page = f"pipelines/{name}.html"
        rel = f"recipes/{name}.yaml"
        for step in spec["steps"]:
            if step["skill"] not in r.skills:
                r.errors.append(
                    f"{rel}:{step.get('line', 0)}: step '{step['id']}' uses unknown skill '{step['skill']}'"
                )

        def href(step: dict) -> str | None:
            return f"../skills/{step['skill']}/index.html" if step["skill"] in r.skills else None

        graph = Markup(site_graph.svg(spec["steps"], href, title=f"step graph of {name}"))
        source = Markup(highlight((r.root / rel).read_text(encoding="utf-8"), "yaml"))
        r.write(
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
            skills=r.skills,
        )
        entries.append(site_data.entry("pipeline", name, name, spec["description"], page, [], "pipeline"))
    return entries


# ---------------------------------------------------------------------------------------------
# Linked files, contributing, the agent catalog, the home and search pages
# ---------------------------------------------------------------------------------------------


def extra_pages(r: Renderer) -> None:
    """Source files, other Markdown and images that Markdown linked to (they may link on)."""
    done: set[str] = set()
    while set(r.extra) - done:
        page = sorted(set(r.extra) - done)[0]
        done.add(page)
        kind, src = r.extra[page]
        dest = r.out / page
        dest.parent.mkdir(parents=True, exist_ok=True)
        if kind == "copy":
            shutil.copyfile(src, dest)
            continue
        text, problem = catalog.read_text(src)
        if problem:
            r.errors.append(f"{r.source_rel(src)}:0: {problem}")
            continue
        if kind == "markdown":
            _markdown_page(r, page, src, text)
        else:
            _source_page(r, page, src, text)


def _markdown_page(r: Renderer, page: str, src: Path, text: str) -> None:
    from markupsafe import Markup

    rel = r.source_rel(src)
    doc = parse_doc(src, text)
    body = Markup(r.render_md(doc, page))
    r.write(
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


def _source_page(r: Renderer, page: str, src: Path, text: str) -> None:
    from markupsafe import Markup

    rel = r.source_rel(src)
    lines = Markup(site_data.source_lines(text, src.suffix.lstrip("."), highlight))
    r.write(page, "source.html.j2", title=rel, rel=rel, active="", source=rel, lines=lines)


def contributing_page(r: Renderer) -> dict:
    """CONTRIBUTING.md rendered (or the built-in page when the repository has none)."""
    from markupsafe import Markup

    contributing = r.root / "CONTRIBUTING.md"
    if contributing.is_file():
        doc = parse_doc(contributing, contributing.read_text(encoding="utf-8"))
        r.write(
            "contributing.html",
            "doc.html.j2",
            title="Contributing",
            heading=None,
            toc=doc.toc,
            crumbs=[],
            body=Markup(r.render_md(doc, "contributing.html")),
            source="CONTRIBUTING.md",
            active="contributing",
        )
    else:
        r.write(
            "contributing.html",
            "contributing.html.j2",
            title="Contributing",
            active="contributing",
            toc=[(2, "Add a skill", "add-a-skill"), (2, "Checks", "checks")],
        )
    return site_data.entry(
        "page", "Contributing", "Contributing", "How to add or improve a skill", "contributing.html", [], "page"
    )


def support_page(r: Renderer) -> None:
    """The skill x model-family table of the last family-matrix run (see skillbook.catalog.support)."""
    from markupsafe import Markup

    from skillbook.catalog import support

    src = r.root / support.RESULTS
    text = (
        "# Model families\n\n"
        + FAMILIES_INTRO
        + "\n\n"
        + (
            support.markdown_table(support.load(src))
            if src.is_file()
            else "No family-matrix results yet: run `make support`."
        )
    )
    doc = parse_doc(src, text)
    body = Markup(r.render_md(doc, "support.html"))
    r.write(
        "support.html",
        "doc.html.j2",
        title="Model families",
        heading=None,
        body=body,
        toc=doc.toc,
        crumbs=[],
        source=r.source_rel(src),
        active="",
    )


FAMILIES_INTRO = (
    "Each cell is one test in the family-matrix suite: a tiny random-init model of that family, built from its "
    "transformers config class with a byte-level BPE tokenizer, run through the skill's recipe with the same "
    "behavioural checks as the project's own Llama. `make support` re-measures the table; CI fails when a run "
    "disagrees with it."
)


def home_and_search_pages(r: Renderer) -> None:
    r.write("index.html", "home.html.j2", title="", active="home")
    r.write("search.html", "search.html.j2", title="Search", active="search")


def catalog_page(r: Renderer) -> None:
    """The agent catalog as downloadable files under catalog/ and as a highlighted page."""
    from markupsafe import Markup

    catalog_files = site_data.agent_catalog(r.root)
    for fname, text in catalog_files.items():
        (r.out / "catalog").mkdir(parents=True, exist_ok=True)
        (r.out / "catalog" / fname).write_text(text, encoding="utf-8")
    shown = {name: Markup(highlight(text, name.rsplit(".", 1)[1])) for name, text in catalog_files.items()}
    r.write(
        "catalog.html",
        "catalog.html.j2",
        title="Agent catalog",
        active="catalog",
        files=shown,
        toc=[(2, "XML", "xml"), (2, "JSON", "json")],
    )
