"""data-preparation: the synthetic world, its splits, cleaning/dedup and the recipe's failure modes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import output, run_skill
from skillbook.cli import main
from skillbook.ml import synthetic, synthetic_questions, synthetic_vocab, synthetic_world, textclean


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def files(result: dict) -> dict[str, bytes]:
    """Every data file of a run (relative path -> bytes), plus stats.json."""
    run_dir = Path(result["run_dir"])
    out = {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*.jsonl"))
        if p.name != "metrics.jsonl"
    }
    out["stats.json"] = (run_dir / "stats.json").read_bytes()
    return out


def corpus_text(result: dict) -> str:
    d = output(result, "corpus")
    return "\n".join(r["text"] for split in ("train", "val") for r in rows(d / f"{split}.jsonl"))


@pytest.fixture(scope="module")
def world_ds() -> synthetic.Dataset:
    return synthetic.generate(0)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(prepared, tmp_path):
    again = run_skill("data-preparation", tmp_path)
    assert files(prepared) == files(again)
    assert len(files(prepared)) == 8  # corpus x2, sft x2, preference x2, eval, stats.json
    # write_default_data (what recipes call when their input is None) gives the very same files.
    paths = synthetic.write_default_data(tmp_path / "default")
    for name in ("corpus", "sft_data", "preference_data", "eval_data"):
        for f in sorted(paths[name].glob("*.jsonl")):
            assert f.read_bytes() == (output(prepared, name) / f.name).read_bytes(), f


def test_different_seed_gives_different_world(tmp_path):
    a = synthetic.write_default_data(tmp_path / "a", seed=0)
    b = synthetic.write_default_data(tmp_path / "b", seed=1)
    for name in ("corpus", "sft_data", "eval_data"):
        assert (a[name] / ("test.jsonl" if name == "eval_data" else "train.jsonl")).read_bytes() != (
            b[name] / ("test.jsonl" if name == "eval_data" else "train.jsonl")
        ).read_bytes()


# ---------------------------------------------------------------------------------------------
# The data teaches what later stages measure
# ---------------------------------------------------------------------------------------------


def test_sizes_and_vocabulary(prepared):
    s = json.loads((Path(prepared["run_dir"]) / "stats.json").read_text())
    assert 300_000 <= s["characters"] <= 1_000_000
    assert 100 <= s["distinct_words"] <= 500  # small closed vocabulary
    assert s["splits"]["corpus/val"] >= 50 and s["splits"]["sft_data/train"] >= 300
    assert s["splits"]["eval_data/test"] >= 80 and s["held_out_questions_in_corpus"] == 0


def test_corpus_is_prose_without_the_qa_format(prepared):
    text = corpus_text(prepared)
    assert "Question:" not in text and "Answer:" not in text
    for r in rows(output(prepared, "sft_data") / "train.jsonl"):
        assert re.fullmatch(r"([^\n]+\.\n)?Question: [^\n]+\?\nAnswer:", r["prompt"]), r
        assert re.fullmatch(r" [A-Za-z0-9]+", r["completion"]), r


def _prompt_to_fact(world: synthetic_world.World) -> dict[str, str]:
    """Fact key of every question (a reading row's passage before "Question:" is ignored)."""
    return {
        synthetic_questions.prompt_for(f.fill(t)): f.key
        for f in world.facts
        for t in synthetic_vocab.QUESTIONS[f.attribute]
    }


def _fact(to_fact: dict[str, str], prompt: str) -> str:
    return to_fact["Question: " + prompt.split("Question: ", 1)[1]]


def test_splits_are_disjoint_by_fact(prepared, world_ds):
    to_fact = _prompt_to_fact(world_ds.world)

    def facts(kind: str, split: str) -> set[str]:
        return {_fact(to_fact, r["prompt"]) for r in rows(output(prepared, kind) / f"{split}.jsonl")}

    train = facts("sft_data", "train") | facts("preference_data", "train")
    test = facts("sft_data", "test") | facts("preference_data", "test")
    held = facts("eval_data", "test")
    assert train and test and held
    assert not train & test and not train & held and not test & held
    # every question type is asked in every split, so SFT must learn the format, not the row
    attribute = {f.key: f.attribute for f in world_ds.world.facts}
    assert {attribute[k] for k in train} == {attribute[k] for k in test} == {attribute[k] for k in held}
    assert {r["kind"] for r in rows(output(prepared, "eval_data") / "test.jsonl")} == {"fact", "arithmetic", "reading"}


def test_every_eval_fact_is_stated_in_the_corpus(prepared, world_ds):
    text = corpus_text(prepared)
    for fact in world_ds.world.facts_in("eval"):
        mentions = sum(text.count(fact.fill(t)) for t in synthetic_vocab.STATEMENTS[fact.attribute])
        assert mentions >= 3, (fact.key, mentions)


def _pools(world) -> list[set[str]]:
    people = {p["name"] for p in world.people}
    pets = {p["pet"] for p in world.people}
    return [
        set(synthetic_vocab.TOWNS),
        set(synthetic_vocab.COLOURS),
        set(synthetic_vocab.FOODS),
        set(synthetic_vocab.JOBS),
        set(synthetic_vocab.SPECIES),
        set(synthetic_vocab.OBJECTS),
        people,
        pets,
    ]


def rejection_kind(row: dict, pools: list[set[str]]) -> str:
    """value (same type as the answer), echo (a word of the question) or attribute (another type)."""
    c, w = row["chosen"].strip(), row["rejected"].strip()
    question = row["prompt"].split("Question: ")[-1].replace("?", " ").split()
    if w in question:
        return "echo"
    if (c.isdigit() and w.isdigit()) or any(c in p and w in p for p in pools):
        return "value"
    return "attribute"


def test_preference_pairs_are_wrong_in_three_ways(prepared, world_ds):
    """Rejected answers are the mistakes small models make: a same-type value, the name asked about,
    or a true value of the wrong type; each kind is a real share of both splits."""
    pools = _pools(world_ds.world)
    known = set().union(*pools)
    for split in ("train", "test"):
        kinds = []
        for r in rows(output(prepared, "preference_data") / f"{split}.jsonl"):
            c, w = r["chosen"].strip(), r["rejected"].strip()
            assert c != w and r["chosen"].startswith(" ") and r["rejected"].startswith(" ")
            assert w.isdigit() or w in known, r  # always a word or number this world uses
            kinds.append(rejection_kind(r, pools))
        for kind in ("value", "echo", "attribute"):
            assert kinds.count(kind) / len(kinds) > 0.2, (split, kind, kinds.count(kind), len(kinds))


# ---------------------------------------------------------------------------------------------
# Cleaning and local sources
# ---------------------------------------------------------------------------------------------


def test_dedup_removes_planted_duplicates_from_jsonl(tmp_path):
    base = [
        f"Document {i} talks about the river, the mill and the {w} boats that sail at dawn every day."
        for i, w in enumerate(["red", "blue", "green", "old", "new", "small"])
    ]
    planted = base + [
        base[0],  # exact copy
        "  " + base[1].replace(" ", "   ") + "\n",  # same after whitespace normalisation
        "Cafe\u0301 opens at nine and sells bread to the whole valley every morning.",
        "Caf\u00e9 opens at nine and sells bread to the whole valley every morning.",  # same after NFC
        base[2] + " Yes.",  # near copy (Jaccard 0.86)
        "too short",
    ]
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in planted))
    assert textclean.jaccard(base[2] + " Yes.", base[2]) >= 0.8
    res = run_skill("data-preparation", tmp_path / "runs", {"source": str(src), "text_field": "body"})
    stats = json.loads((Path(res["run_dir"]) / "stats.json").read_text())
    assert stats["exact_duplicates_removed"] == 3
    assert stats["near_duplicates_removed"] == 1
    assert stats["cleaning"]["too_short"] == 1 and stats["documents"] == 7
    kept = corpus_text(res)
    assert "Cafe\u0301" not in kept and "Caf\u00e9" in kept
    # the supervised sets are still the embedded ones
    assert rows(output(res, "eval_data") / "test.jsonl")


def test_near_dedup_keeps_distinct_documents():
    docs = [
        f"{a} plus {b} is {a + b}. The sum of {b} and {a} is {a + b}. Count them twice to be sure."
        for a in range(5)
        for b in range(5)
    ]
    kept, stats = textclean.clean(docs)
    assert stats.near_duplicates == 0 and len(kept) == len(docs)


def test_local_txt_source(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text(
        "The first chapter is about a lighthouse on a cold northern coast.\n\n"
        "The second chapter follows the keeper through a long winter storm.\n\n\n"
        "The third chapter ends with spring and a ship arriving at the harbour.\n"
    )
    res = run_skill("data-preparation", tmp_path / "runs", {"source": str(src)})
    docs = [r["text"] for s in ("train", "val") for r in rows(output(res, "corpus") / f"{s}.jsonl")]
    assert len(docs) == 3 and all(d.startswith("The ") for d in docs)
    assert len(rows(output(res, "corpus") / "val.jsonl")) == 1


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["source=/no/such/file.jsonl"], "does not exist"),
        (["source=hub:roneneldan/TinyStories", "max_documents=10"], "HF_HUB_OFFLINE"),
    ],
)
def test_bad_source_fails_before_any_run_dir(tmp_path, monkeypatch, sets, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    args = ["run", "data-preparation", "--runs-dir", str(runs)]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "source" in result.output and needle in result.output
    assert not runs.exists() or not any(runs.rglob("config.yaml"))


def test_folder_of_parquet_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "shards"
    src.mkdir()
    texts = [f"Shard document number {i} describes a different hill, river and road in the north." for i in range(6)]
    pq.write_table(pa.table({"content": texts[:3]}), src / "a.parquet")
    (src / "b.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts[3:] + texts[:1]))
    res = run_skill("data-preparation", tmp_path / "runs", {"source": str(src), "text_field": "content"})
    stats = json.loads((Path(res["run_dir"]) / "stats.json").read_text())
    assert stats["documents"] == 6 and stats["exact_duplicates_removed"] == 1  # texts[0] is in both shards
    assert stats["source"] == str(src)


def test_json_list_and_malformed_jsonl(tmp_path):
    from skillbook.errors import SkillbookError

    good = tmp_path / "docs.json"
    good.write_text(json.dumps([{"text": f"A json list document number {i} about winter roads."} for i in range(3)]))
    res = run_skill("data-preparation", tmp_path / "runs", {"source": str(good)})
    assert json.loads((Path(res["run_dir"]) / "stats.json").read_text())["documents"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of text for the corpus"}\n{"text": broken\n')
    with pytest.raises(SkillbookError, match=r"not valid JSON lines"):
        run_skill("data-preparation", tmp_path / "runs", {"source": str(bad)})


def test_reading_rows_state_the_answer_and_no_same_type_rejection(prepared, world_ds):
    prefs = rows(output(prepared, "preference_data") / "test.jsonl")
    reading = [r for r in prefs if "\nQuestion: " in r["prompt"]]
    assert len(reading) == len(prefs) - len(reading) > 100  # every question has a reading twin
    pools = _pools(world_ds.world)
    for r in reading:
        words = set(r["prompt"].split("\nQuestion: ")[0].replace(".", " ").split())
        assert r["chosen"].strip() in words, r
        if rejection_kind(r, pools) == "value":  # a same-type wrong answer is never readable in the passage
            assert r["rejected"].strip() not in words, r
