"""The skill x model-family support table: rendering, README sync, and the check that a run agrees with it."""

from __future__ import annotations

import pytest

from conftest import ROOT
from skillbook.catalog import support

RESULTS = {
    "machine": "test CPU, fp32",
    "families": ["llama", "gpt2"],
    "cells": {
        "sft": {"llama": {"status": "pass"}, "gpt2": {"status": "pass"}},
        "quantization": {"llama": {"status": "pass"}, "gpt2": {"status": "refused", "reason": "no converter"}},
    },
}


def test_table_marks_every_cell_and_footnotes_refusals():
    table = support.markdown_table(RESULTS)
    assert "| skill | llama | gpt2 |" in table
    assert "| sft | ✅ | ✅ |" in table
    assert "| quantization | ✅ | ⛔ (1) |" in table
    assert "1. quantization on gpt2: no converter" in table
    assert "test CPU, fp32" in table


def test_untested_cells_say_so():
    results = {**RESULTS, "families": ["llama", "gpt2", "qwen2"]}
    assert "| sft | ✅ | ✅ | not tested |" in support.markdown_table(results)


def test_readme_block_is_replaced_between_markers():
    readme = f"intro\n{support.README_START}\nold table\n{support.README_END}\nrest\n"
    out = support.with_table(readme, "NEW\n")
    assert out == f"intro\n{support.README_START}\nNEW\n{support.README_END}\nrest\n"
    with pytest.raises(ValueError, match="markers"):
        support.with_table("no markers here", "NEW\n")


def test_a_run_that_disagrees_with_the_table_is_reported():
    fresh = {"cells": {"sft": {"gpt2": {"status": "fail"}}, "grpo": {"llama": {"status": "pass"}}}}
    problems = support.disagreements(RESULTS, fresh)
    assert problems == ["sft on gpt2: published pass, this run fail", "grpo on llama: published absent, this run pass"]
    assert support.disagreements(RESULTS, {"cells": {"sft": {"llama": {"status": "pass"}}}}) == []


def test_merge_keeps_cells_a_partial_run_did_not_touch():
    merged = support.merge(RESULTS, {"sft": {"gpt2": {"status": "fail"}}}, ["llama", "gpt2"], "m")
    assert merged["cells"]["sft"] == {"gpt2": {"status": "fail"}, "llama": {"status": "pass"}}
    assert merged["cells"]["quantization"]["gpt2"]["status"] == "refused"


def test_readme_shows_the_published_table():
    published = ROOT / support.RESULTS
    assert published.is_file(), "no published family-matrix results: run `make support`"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    expected = support.with_table(readme, support.markdown_table(support.load(published)))
    assert readme == expected, "README.md's support table is stale: run `skills support --write`"


def test_values_table_renders_recorded_values_with_their_machine():
    cells = {
        "llama": {"status": "pass", "values": {"rel diff": 4.7e-07, "ids": "4 of 4"}, "machine": "CPU X, fp32"},
        "gpt2": {"status": "pass"},  # no values recorded: no row
    }
    results = {"families": ["llama", "gpt2"], "cells": {"quantization": cells}}
    table = support.values_table(results, "quantization")
    assert table is not None and "| llama | 4.7e-07 | 4 of 4 |" in table and "gpt2" not in table
    assert "on CPU X, fp32." in table
    start = support.values_start("quantization")
    doc = f"a\n{start}\nold\n{support.VALUES_END}\nb\n"
    assert support.with_values(doc, results) == f"a\n{start}\n{table}{support.VALUES_END}\nb\n"
    with pytest.raises(ValueError, match="no values for 'sft'"):
        support.with_values(doc.replace("quantization", "sft"), results)


def test_skill_docs_show_the_published_family_values():
    published = support.load(ROOT / support.RESULTS)
    docs = [d for d in sorted((ROOT / "skills").glob("*/SKILL.md")) if "<!-- support-values:start " in d.read_text()]
    assert docs, "quantization's family table is generated from the support record"
    for doc in docs:
        text = doc.read_text()
        assert text == support.with_values(text, published), f"{doc} is stale: run `skills support --write`"
