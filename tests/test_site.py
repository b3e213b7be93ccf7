"""The docs site: a page per skill, reference and pipeline; links and anchors resolve; search and config tables
are right."""

from __future__ import annotations

import json
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillbook import catalog
from skillbook.errors import SkillbookError
from skillbook.site import build as site
from skillbook.site import data as site_data
from skillbook.site import links as site_links
from skillbook.site import markdown as site_md

ROOT = Path(__file__).resolve().parents[1]

RECIPE = '''\
from typing import Literal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from skillbook.run.recipe import RecipeConfig
from skillbook.run.runner import RunContext

OUTPUTS = {{"{output}": "{kind}"}}
INPUTS = {{}}


class Sched(BaseModel):
    """Learning-rate schedule."""

    model_config = ConfigDict(extra="forbid")
    warmup: int = Field(5, ge=0, description="Warm-up steps before the peak rate.")
    kind: Literal["cosine", "linear"] = Field("cosine", description="Decay shape after warm-up.")


class Config(RecipeConfig):
    corpus: str | None = Field(None, description="Corpus directory; None = embedded default data.")
    steps: int = Field(10, ge=1, le=100000, description="Optimizer steps.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    mode: Literal["fast", "exact"] = Field("fast", description="Speed or fidelity.")
    sched: Sched = Field(default_factory=Sched, description="Schedule settings.")
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="Module suffixes.")


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    """Write one file."""
    (ctx.out_dir / "{output}").write_text("x")
    return {{"{output}": ctx.out_dir / "{output}"}}
'''


def skill_md(name: str, description: str, stage: str, body: str, extra_meta: str = "") -> str:
    return (
        f"---\nname: {name}\ndescription: {description}\nlicense: Apache-2.0\nmetadata:\n  stage: {stage}\n"
        f"  recipe: recipe.py\n{extra_meta}---\n\n{textwrap.dedent(body).strip()}\n"
    )


def make_repo(root: Path) -> Path:
    """Two skills with references, recipes and a preset, a pipeline, a contributing guide, a benchmark."""
    data = root / "skills" / "toy-data"
    (data / "references").mkdir(parents=True)
    (data / "SKILL.md").write_text(
        skill_md(
            "toy-data",
            "Builds a tiny zebra corpus for tests. Use when a pipeline needs text to train on.",
            "data",
            """
        # Toy data

        Makes text. See [the guide](references/guide.md), its [knobs](references/guide.md#the-knobs-that-matter),
        then [train on it](../toy-train/SKILL.md#defaults-that-work) with the [recipe](recipe.py#L1).

        ## Quick start

        ```bash
        skills run toy-data --dry-run
        ```

        ## Notes

        Back to [the start](#quick-start).

        ## Notes

        Also see [Größe](#größe-α) and [the guide](references/guide.md "Guide").

        ## Größe α

        ## Notes

        A second heading with the same text gets its own anchor.
        """,
            '  tested-with: "torch==2.13.0 transformers==5.23.0"\n',
        )
    )
    (data / "references" / "guide.md").write_text(
        "# Guide\n\nWhy the defaults are what they are.\n\n## The knobs that matter\n\n"
        "Back to [the skill](../SKILL.md#notes-1).\n\n"
        "![the data flow](flow.svg)\n\n"
        "```python fragment\nsteps = 10\n```\n"
    )
    (data / "references" / "flow.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (data / "recipe.py").write_text(RECIPE.format(output="corpus", kind="corpus"))
    (data / "recipe.yaml").write_text("# yaml-language-server: $schema=../../schemas/toy-data.schema.json\nsteps: 5\n")
    train = root / "skills" / "toy-train"
    (train / "references").mkdir(parents=True)
    (train / "configs").mkdir()
    (train / "SKILL.md").write_text(
        skill_md(
            "toy-train",
            "Trains a quokka model on the toy corpus. Use when testing training.",
            "post-training",
            """
        # Toy train

        Needs [toy data](../toy-data/SKILL.md) first; the [reference](references/scale.md).

        ## Defaults that work

        `steps: 10`.
        """,
        )
    )
    (train / "references" / "scale.md").write_text("# Scaling up\n\nUse a GPU.\n")
    (train / "recipe.py").write_text(RECIPE.format(output="model", kind="hf-model"))
    (train / "recipe.yaml").write_text("# yaml-language-server: $schema=../../schemas/toy-train.schema.json\n")
    (train / "configs" / "big.yaml").write_text("# GPU-scale: 1000 steps\nsteps: 1000\n")
    (root / "recipes").mkdir()
    (root / "recipes" / "toyrun.yaml").write_text(
        textwrap.dedent("""\
        name: toyrun
        description: Data, then training, then a second data pass that reads both.
        steps:
          - id: data
            skill: toy-data
          - id: train
            skill: toy-train
            config:
              corpus: ${steps.data.corpus}
          - id: again
            skill: toy-data
            config:
              corpus: "${steps.data.corpus} ${steps.train.model}"
        """)
    )
    (root / "CONTRIBUTING.md").write_text(
        "# Contributing\n\nStart from [toy data](skills/toy-data/SKILL.md).\n\n## Checks\n\nRun lint.\n"
    )
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "benchmarks" / "results" / "toy-data.json").write_text(
        json.dumps({"docs_per_s": 1234.5, "meta": {"n": 3}, "name": "x"})
    )
    for stamp, summary in (("20260101-000000-aaaa", {"old_metric": 1}), ("20260102-000000-bbbb", {"final_loss": 2.25})):
        run = root / "runs" / "toy-data" / stamp
        run.mkdir(parents=True)
        (run / "outputs.json").write_text(json.dumps({"outputs": {}, "summary": summary}))
    (run / "loss.png").write_bytes(tiny_png())
    return root


def tiny_png() -> bytes:
    """A valid 1x1 PNG, so the browser shows a real image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00\x40\x80\xc0"))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def built(repo, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("site") / "site"
    return out, site.build(out, root=repo)


class Table(HTMLParser):
    """Rows of the config table as lists of cell texts."""

    def __init__(self):
        super().__init__()
        self.rows, self._in, self._cell = [], False, None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and "config-table" in (dict(attrs).get("class") or ""):
            self._in = True
        elif self._in and tag == "tr":
            self.rows.append([])
        elif self._in and tag == "td":
            self._cell = []
        elif self._in and tag == "br" and self._cell is not None:
            self._cell.append("\n")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        elif self._in and tag == "td":
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_every_skill_reference_and_pipeline_gets_a_page(built, repo):
    out, result = built
    assert result["skills"] == 2 and result["pipelines"] == 1
    for name in ("toy-data", "toy-train"):
        assert (out / "skills" / name / "index.html").is_file()
    assert (out / "skills/toy-data/references/guide.html").is_file()
    assert (out / "skills/toy-train/references/scale.html").is_file()
    assert (out / "pipelines/toyrun.html").is_file()
    for page in (
        "index.html",
        "search.html",
        "contributing.html",
        "catalog.html",
        "files/skills/toy-data/recipe.py.html",
        "files/skills/toy-train/configs/big.yaml.html",
        "skills/toy-data/SKILL.md",
    ):
        assert (out / page).is_file(), page
    home = (out / "index.html").read_text()
    assert "Builds a tiny zebra corpus" in home and "Post-training" in home
    assert "Start from" in (out / "contributing.html").read_text()  # the repo's own guide, not the fallback


def test_every_internal_link_and_anchor_resolves(built):
    out, _ = built
    assert site_links.check(out) == []
    page = (out / "skills/toy-data/index.html").read_text()
    # Markdown links became site links: reference pages, the other skill's page and its heading anchor
    assert 'href="references/guide.html"' in page
    assert 'href="references/guide.html#the-knobs-that-matter"' in page
    assert 'href="../toy-train/index.html#defaults-that-work"' in page
    assert 'href="../../files/skills/toy-data/recipe.py.html#L1"' in page
    assert 'id="notes"' in page and 'id="notes-1"' in page  # duplicate headings get distinct anchors
    guide = (out / "skills/toy-data/references/guide.html").read_text()
    assert 'href="../index.html#notes-1"' in guide
    assert "fragment, not run" in guide
    assert 'src="../../../files/skills/toy-data/references/flow.svg"' in guide  # images are copied next to the site
    assert (out / "files/skills/toy-data/references/flow.svg").is_file()


def test_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "index.html").write_text(
        '<h2 id="x">x</h2><a href="#x">ok</a><a href="#nope">bad</a>'
        '<a href="a/b.html">gone</a><a href="https://example.org/">ext</a>'
    )
    broken = site_links.check(tmp_path)
    assert {(b.href, b.reason) for b in broken} == {
        ("#nope", "no anchor #nope in index.html"),
        ("a/b.html", "a/b.html does not exist"),
    }


def test_search_index_contains_every_skill_with_its_headings(built):
    out, _ = built
    index = json.loads((out / "search-index.json").read_text())["entries"]
    skills = {e["name"]: e for e in index if e["kind"] == "skill"}
    assert set(skills) == {"toy-data", "toy-train"}
    assert skills["toy-data"]["description"].startswith("Builds a tiny zebra corpus")
    assert ["Quick start", "skills/toy-data/index.html#quick-start"] in skills["toy-data"]["headings"]
    assert any(e["kind"] == "pipeline" and e["name"] == "toyrun" for e in index)
    assert any(e["kind"] == "reference" and e["url"] == "skills/toy-data/references/guide.html" for e in index)
    js = (out / "static/search-index.js").read_text()
    assert js.startswith("window.SKILLBOOK_INDEX=") and '"toy-train"' in js
    for e in index:  # every URL the search can show exists
        assert (out / e["url"]).is_file()


def test_config_table_matches_the_schema(built, repo):
    from skillbook.run import recipe

    out, _ = built
    schema = recipe.load(repo / "skills" / "toy-data").Config.model_json_schema()
    parser = Table()
    parser.feed((out / "skills/toy-data/index.html").read_text())
    rows = {r[0]: r for r in parser.rows if r}
    props = schema["properties"]
    nested = {
        f"{block}.{k}": v
        for block, model in (("sched", "Sched"), ("tracking", "Tracking"))  # tracking: every Config has it
        for k, v in schema["$defs"][model]["properties"].items()
    }
    assert set(rows) == set(props) | set(nested)
    for name, prop in [*props.items(), *nested.items()]:
        field, type_, default, description = rows[name]
        assert description == prop["description"]
        if "default" in prop:
            assert default == json.dumps(prop["default"])
    assert rows["steps"][1] == "integer\n≥ 1, ≤ 100000"
    assert rows["corpus"][1] == "string | null"
    assert rows["mode"][1] == '"fast" | "exact"'
    assert rows["lr"][1] == "number\n> 0"
    assert rows["targets"][2] == '["q_proj", "v_proj"]'  # a default_factory value the schema leaves out
    assert rows["sched"][2] == "see below"


def test_skill_page_shows_run_command_presets_tested_with_and_results(built):
    out, _ = built
    data = (out / "skills/toy-data/index.html").read_text()
    assert "skills run toy-data --json\nskills run toy-data --dry-run --set steps=10\n" in data
    assert "<code>torch</code></td><td><code>2.13.0</code>" in data
    assert "<code>docs_per_s</code></td><td>1234.5</td>" in data
    assert "<code>meta.n</code>" in data
    # the newest run's summary and plots; older runs are not shown
    assert "<code>final_loss</code></td><td>2.25</td>" in data and "old_metric" not in data
    assert 'src="../../files/runs/toy-data/20260102-000000-bbbb/loss.png"' in data
    train = (out / "skills/toy-train/index.html").read_text()
    assert "--set steps=10\nskills run toy-train --preset big\n" in train and "GPU-scale: 1000 steps" in train
    assert "Not recorded yet." in train
    assert 'id="results"' not in train  # no figures: no section
    assert "in pipeline toyrun" in train


def test_pipeline_page_draws_the_step_graph(built):
    out, _ = built
    page = (out / "pipelines/toyrun.html").read_text()
    svg = page[page.index("<svg") : page.index("</svg>")]
    for step in ("data", "train", "again"):
        assert f'id="node-{step}"' in svg
    assert svg.count('class="dag-edge"') == 3  # data→train, data→again, train→again
    assert "data → again: corpus" in svg and "train → again: model" in svg
    assert 'href="../skills/toy-train/index.html"' in svg
    assert svg.count('class="dag-bus"') == 1  # data→again skips a row: one lane from data
    assert "← corpus, model</text>" in svg  # the box of `again` lists what it reads


def test_edges_and_layers_follow_references():
    from skillbook.site import graph as site_graph

    steps = [
        {"id": "a", "skill": "x", "config": {}},
        {"id": "b", "skill": "y", "config": {"m": "${steps.a.corpus}"}},
        {"id": "c", "skill": "z", "config": {"n": ["${steps.b.model}", {"k": "${steps.a.tokenizer}"}]}},
    ]
    edges = site_graph.edges(steps)
    assert [(e.src, e.dst, e.outputs) for e in edges] == [
        ("a", "b", ["corpus"]),
        ("b", "c", ["model"]),
        ("a", "c", ["tokenizer"]),
    ]
    assert site_graph.layers(steps, edges) == {"a": 0, "b": 1, "c": 2}


def test_agent_catalog_downloads_list_every_skill_without_local_paths(built, repo):
    out, _ = built
    xml = (out / "catalog/available_skills.xml").read_text()
    data = json.loads((out / "catalog/available_skills.json").read_text())
    assert xml.count("<skill>") == 2 and "<location>skills/toy-data/SKILL.md</location>" in xml
    assert {s["name"] for s in data["available_skills"]} == {"toy-data", "toy-train"}
    assert str(repo) not in xml and str(repo) not in json.dumps(data)


@pytest.mark.parametrize(
    "link, message",
    [
        (
            "[gone](references/missing.md)",
            "skills/toy-data/SKILL.md:{line}: link 'references/missing.md': "
            "skills/toy-data/references/missing.md does not exist",
        ),
        ("[case](references/Guide.md)", "skills/toy-data/SKILL.md:{line}: link 'references/Guide.md'"),
        (
            "[anchor](references/guide.md#no-such-heading)",
            "skills/toy-data/SKILL.md:{line}: link 'references/guide.md#no-such-heading': no anchor #no-such-heading",
        ),
        ("[here](#nowhere)", "skills/toy-data/SKILL.md:{line}: link '#nowhere': no anchor #nowhere"),
    ],
)
def test_unresolvable_link_fails_the_build_with_file_and_line(tmp_path, link, message):
    repo = make_repo(tmp_path / "repo")
    md = repo / "skills/toy-data/SKILL.md"
    text = md.read_text().replace(
        "Back to [the start](#quick-start).", f"Back to [the start](#quick-start).\nAnd {link} too."
    )
    md.write_text(text)
    line = text.splitlines().index(f"And {link} too.") + 1
    with pytest.raises(SkillbookError) as exc:
        site.build(tmp_path / "out", root=repo)
    assert message.format(line=line) in str(exc.value)


def test_build_refuses_to_wipe_a_folder_it_did_not_build(tmp_path, repo):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SkillbookError, match="not a Skillbook site build"):
        site.build(tmp_path, root=repo)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    out = tmp_path / "site"
    site.build(out, root=repo)
    site.build(out, root=repo)  # a previous build is replaced
    assert (out / "index.html").is_file()


def test_slugs_match_github_anchors():
    assert site_md.slugify("Defaults that work (CPU, 2 cores)") == "defaults-that-work-cpu-2-cores"
    assert site_md.slugify("`lora_r` and α") == "lora_r-and-α"
    assert site_md.slugify("Scale: 8B on 8×H100") == "scale-8b-on-8h100"


def test_cli_build_prints_counts_and_time(repo, tmp_path, monkeypatch):
    from skillbook.cli import main

    monkeypatch.setenv("SKILLBOOK_ROOT", str(repo))
    res = CliRunner().invoke(main, ["site", "build", "--out", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["skills"] == 2 and data["pages"] >= 10 and data["seconds"] > 0


def test_real_library_builds_with_every_link_resolved(tmp_path):
    """Every skill in this repository gets a page, every link resolves, the index lists every skill."""
    skills = [s for s in catalog.load_all(ROOT)]
    if not skills:
        pytest.skip("no skills in skills/ yet")
    out = tmp_path / "site"
    result = site.build(out, root=ROOT)
    assert result["skills"] == len(skills)
    for s in skills:
        assert (out / "skills" / s.folder / "index.html").is_file()
        for ref in s.references:
            assert (out / "skills" / s.folder / "references" / f"{ref.stem}.html").is_file()
    for p in catalog.pipeline_files(ROOT):
        assert (out / "pipelines" / f"{p.stem}.html").is_file()
    assert site_links.check(out) == []
    names = {e["name"] for e in json.loads((out / "search-index.json").read_text())["entries"] if e["kind"] == "skill"}
    assert names == {s.name for s in skills}
    for s in skills:
        schema = site_data.load_schema(s.path, ROOT)
        if schema:
            page = (out / "skills" / s.folder / "index.html").read_text()
            for row in site_data.config_rows(schema):
                assert f'id="config-{row["field"]}"' in page


def test_pipeline_with_an_unknown_skill_or_bad_yaml_fails_the_build(tmp_path):
    repo = make_repo(tmp_path / "repo")
    pipe = repo / "recipes" / "toyrun.yaml"
    pipe.write_text(pipe.read_text().replace("skill: toy-train", "skill: toy-trian"))
    with pytest.raises(SkillbookError, match=r"recipes/toyrun.yaml:6: step 'train' uses unknown skill 'toy-trian'"):
        site.build(tmp_path / "out", root=repo)
    pipe.write_text("name: toyrun\nsteps: []\n")
    with pytest.raises(SkillbookError, match=r"recipes/toyrun.yaml: not a valid pipeline"):
        site.build(tmp_path / "out2", root=repo)


def test_a_rebuild_from_the_highlight_cache_is_byte_identical(tmp_path, repo):
    first = site.build(tmp_path / "a", root=repo)
    assert (repo / ".skillbook-cache" / "site-highlight.json").is_file()
    site_md._CACHE.clear()  # the second build reads highlights from disk only
    site.build(tmp_path / "b", root=repo)
    for page in ("skills/toy-data/index.html", "files/skills/toy-data/recipe.py.html", "pipelines/toyrun.html"):
        assert (tmp_path / "a" / page).read_bytes() == (tmp_path / "b" / page).read_bytes(), page
    assert first["pages"] > 10
