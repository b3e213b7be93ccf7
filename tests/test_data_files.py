"""Data where the user has it: `data`, `eval_data` and `corpus` take a file or a folder (skillbook.ml.data_files).

The reader on every format (jsonl, json, parquet, txt), folders with today's names and the common
alternatives, the seeded split of a single file, and every bad input as one ConfigError naming the field,
the file (and line) and the fix; the Config refuses a bad layout at `--dry-run` already. Then the recipes
end to end on tiny settings: sft on one .jsonl file (split by eval_fraction), evaluation on one eval.jsonl,
pretraining (and the tokenizer it trains) on one .txt corpus, moe's .txt corpus at --dry-run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import output, run_skill
from skillbook.cli import main
from skillbook.errors import ConfigError
from skillbook.ml import data_files as df
from skillbook.ml import tokenizer_utils as tu
from skillbook.run import recipe

ROOT = Path(__file__).resolve().parents[1]
QA = ("prompt", "completion")


def qa(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question: q{i}?\nAnswer:", "completion": f" a{i}"} for i in range(start, start + n)]


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---- formats -----------------------------------------------------------------------------------------------


def test_every_row_format_reads_the_same_rows(tmp_path):
    rows = qa(5)
    files = [
        jsonl(tmp_path / "a.jsonl", rows),
        tmp_path / "b.json",
        tmp_path / "c.json",
        parquet(tmp_path / "d.parquet", rows),
    ]
    files[1].write_text(json.dumps(rows))
    files[2].write_text(json.dumps({"data": rows}))
    for f in files:
        assert [{k: r[k] for k in QA} for r in df.read_rows(f, "data", QA)] == rows, f
    # blank lines and a UTF-8 byte-order mark are fine; extra columns are kept (TRL gets only `columns`)
    (tmp_path / "e.jsonl").write_text("\ufeff" + json.dumps({**rows[0], "kind": "fact"}) + "\n\n")
    assert df.read_rows(tmp_path / "e.jsonl", "data", QA) == [{**rows[0], "kind": "fact"}]


def test_corpus_formats_txt_paragraphs_or_lines(tmp_path):
    para = tmp_path / "para.txt"
    para.write_text("First doc,\nstill first.\n\n  \nSecond doc.\r\n\r\nThird.\n", encoding="utf-8")
    assert df.read_texts(para) == ["First doc,\nstill first.", "Second doc.", "Third."]
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n\nthree\n".replace("\n\n", "\n"))  # no blank line: one document per line
    assert df.read_texts(lines) == ["one", "two", "three"]
    texts = [{"text": "α"}, {"text": "β"}]
    assert df.read_texts(parquet(tmp_path / "c.parquet", texts)) == ["α", "β"]
    assert df.read_texts(jsonl(tmp_path / "c.jsonl", texts)) == ["α", "β"]
    assert list(tu.read_texts(tmp_path / "c.jsonl", limit=1)) == ["α"]  # the tokenizer's reader is this one


# ---- folders ----------------------------------------------------------------------------------------------


def test_folders_keep_todays_names_and_take_common_alternatives(tmp_path):
    today = tmp_path / "today"
    jsonl(today / "train.jsonl", qa(4))
    jsonl(today / "test.jsonl", qa(2, 10))
    s = df.load_splits(today, "data", QA, 0.1, 0)
    assert (len(s.train), len(s.held)) == (4, 2) and s.note == (
        f"data: {today / 'train.jsonl'} (4 rows) train / {today / 'test.jsonl'} (2 rows) held-out"
    )
    hf = tmp_path / "hf"  # Hugging Face style names and formats
    parquet(hf / "train.parquet", qa(4))
    parquet(hf / "validation.parquet", qa(3, 10))
    assert len(df.load_splits(hf, "data", QA, 0.1, 0).held) == 3
    assert df.load_held_out(hf, "eval_data", QA).held_source == str(hf / "validation.parquet")
    jsonl(hf / "eval.jsonl", qa(1, 20))  # 'eval' comes before 'validation' in HELD_OUT_NAMES
    assert df.load_held_out(hf, "eval_data", QA).held == qa(1, 20)
    corpus = tmp_path / "corpus"
    (corpus / "train.txt").parent.mkdir()
    (corpus / "train.txt").write_text("a\n\nb\n\nc\n")
    jsonl(corpus / "valid.jsonl", [{"text": "v"}])
    train, val, note = df.corpus_sources(corpus, "corpus", 0.05, 0)
    assert list(train) == ["a", "b", "c"] and val == ["v"] and "(3 docs) train" in note
    assert df.load_held_out(corpus, "corpus", None).held == ["v"]


def test_a_train_only_folder_or_one_file_is_split_by_a_seeded_fraction(tmp_path):
    f = jsonl(tmp_path / "my.jsonl", qa(1000))
    a = df.load_splits(f, "data", QA, 0.1, 0)
    assert (len(a.train), len(a.held)) == (900, 100)
    assert a.note == f"data: {f} (1,000 rows) -> 900 train / 100 held-out (eval_fraction 0.1, seed 0)"
    assert a.held_source == f"{f} (held-out by eval_fraction 0.1, seed 0)"
    b = df.load_splits(f, "data", QA, 0.1, 0)
    assert (a.train, a.held) == (b.train, b.held), "same seed, same split"
    c = df.load_splits(f, "data", QA, 0.1, 1)
    assert a.held != c.held and len(c.held) == 100
    assert not {r["prompt"] for r in a.train} & {r["prompt"] for r in a.held}, "no row is in both"
    order = [int(r["completion"][2:]) for r in a.held]
    assert order == sorted(order), "both parts keep the file order"
    assert len(df.load_splits(f, "data", QA, 0.1, 0, split=False).train) == 1000  # eval_data given elsewhere
    only_train = tmp_path / "only-train"
    jsonl(only_train / "train.jsonl", qa(10))
    assert [len(x) for x in (df.load_splits(only_train, "data", QA, 0.2, 0).train, a.held[:2])] == [8, 2]
    assert len(df.split_by_fraction(list(range(2)), 0.01, 0, "data", f)[1]) == 1, "at least one held-out row"


# ---- errors: one ConfigError naming the field, the file (and line) and the fix -------------------------------


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b'{"prompt": "p", "completion": "c"}\n{"prompt": "p", \n', r"data: .*bad\.jsonl:2 is not valid JSON"),
        (b'{"prompt": "p"}\n', r"data: .*bad\.jsonl:1 has no 'completion' column \(got 'prompt'\); each row needs"),
        (b'{"prompt": "p", "completion": 3}\n', r"bad\.jsonl:1 column 'completion' must be a string \(got int\)"),
        (b'["p", "c"]\n', r"bad\.jsonl:1 is a JSON list, not an object"),
        (b"\n\n", r"data: .*bad\.jsonl has no rows"),
        (b'{"prompt": "caf\xe9"}\n', r"data: .*bad\.jsonl:1 is not UTF-8 text \(byte 0xe9 at offset 15\)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", r"data: .*bad\.jsonl:1 is not UTF-8 text"),
        (b'{"prompt": "p", "completion": "c"}\x00\n', r"data: .*bad\.jsonl looks binary \(a NUL byte"),
    ],
)
def test_bad_rows_are_one_clear_error(tmp_path, content, pattern):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=pattern):
        df.load_splits(bad, "data", QA, 0.1, 0)


def test_bad_files_and_folders_are_one_clear_error(tmp_path):
    cases = []
    (tmp_path / "x.csv").write_text("prompt,completion\n")
    cases.append((tmp_path / "x.csv", r"data: .*x\.csv has unsupported type '\.csv'; use \.jsonl/\.json/\.parquet"))
    (tmp_path / "x.txt").write_text("hello\n")
    cases.append((tmp_path / "x.txt", r"use \.jsonl/\.json/\.parquet \(\.txt is read only for a corpus\)"))
    cases.append((tmp_path / "nope.jsonl", r"data: .*nope\.jsonl does not exist; pass a \.jsonl"))
    (tmp_path / "obj.json").write_text('{"rows": []}')
    cases.append((tmp_path / "obj.json", r'obj\.json must hold a JSON list of objects \(or \{"data": \[\.\.\.\]\}\)'))
    (tmp_path / "broken.json").write_text('[{"prompt": "p",\n "completion": }]')
    cases.append((tmp_path / "broken.json", r"data: .*broken\.json:2 is not valid JSON"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    cases.append((tmp_path / "junk.parquet", r"data: .*junk\.parquet is not a readable Parquet file"))
    jsonl(tmp_path / "one.jsonl", qa(1))
    cases.append((tmp_path / "one.jsonl", r"one\.jsonl has 1 row; a held-out split needs at least 2 rows"))
    (tmp_path / "empty-dir").mkdir()
    cases.append((tmp_path / "empty-dir", r"data: .*empty-dir has no train.* file; a data folder holds train"))
    both = tmp_path / "both"
    jsonl(both / "train.jsonl", qa(2))
    jsonl(both / "test.jsonl", qa(2))
    parquet(both / "test.parquet", qa(2))
    cases.append((both, r"data: .*both holds both test\.jsonl and test\.parquet; keep one of them"))
    for path, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            df.load_splits(path, "data", QA, 0.1, 0)
    with pytest.raises(ConfigError, match=r"eval_data: .*empty-dir has no held-out file \(test/eval/validation"):
        df.load_held_out(tmp_path / "empty-dir", "eval_data", QA)
    jsonl(tmp_path / "nt.jsonl", [{"txt": "a"}])
    with pytest.raises(ConfigError, match=r"corpus: .*nt\.jsonl:1 has no 'text' column \(got 'txt'\)"):
        df.read_texts(tmp_path / "nt.jsonl")
    (tmp_path / "latin1.txt").write_bytes("Köln\n\nZürich\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"corpus: .*latin1\.txt:1 is not UTF-8 text"):
        list(tu.read_texts(tmp_path / "latin1.txt"))


def test_the_config_refuses_a_bad_layout_before_anything_runs(tmp_path):
    """The Config checks names (cheap) so --dry-run fails like the real run; a missing path or a pipeline
    reference is left to the runner's input check."""
    sft = recipe.load(ROOT / "skills" / "sft")
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(ConfigError, match=r"data: .*data\.csv has unsupported type '\.csv'"):
        recipe.resolve(sft, overrides={"model": "/m", "data": str(tmp_path / "data.csv")})
    for value in ("${steps.data.sft_data}", str(tmp_path / "not-yet")):
        assert recipe.resolve(sft, overrides={"model": "/m", "data": value}).data == value
    (tmp_path / "c.txt").write_text("one doc\n\nanother doc\n")
    runs = tmp_path / "runs"
    ok = CliRunner().invoke(main, ["run", "moe", "--set", f"corpus={tmp_path / 'c.txt'}", "--dry-run"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, ["run", "moe", "--set", f"corpus={tmp_path / 'data.csv'}", "--runs-dir", str(runs)])
    assert bad.exit_code != 0 and bad.output.count("error:") == 1 and "Traceback" not in bad.output
    assert "corpus" in bad.output and "unsupported type '.csv'" in bad.output and not runs.exists()
    ev = CliRunner().invoke(
        main, ["run", "evaluation", "--set", "model=/m", "--set", f"eval_data={tmp_path}", "--dry-run"]
    )
    assert ev.exit_code != 0 and "eval_data" in ev.output and "has no held-out file" in ev.output


# ---- the recipes end to end, tiny --------------------------------------------------------------------------


def log(res: dict) -> str:
    return (Path(res["run_dir"]) / "log.txt").read_text()


def test_sft_trains_on_one_jsonl_file_split_by_eval_fraction(prepared, family_model, tmp_path):
    rows = [json.loads(x) for x in (output(prepared, "sft_data") / "train.jsonl").read_text().splitlines()[:40]]
    data = jsonl(tmp_path / "mine.jsonl", rows)
    sets = {"model": str(family_model("llama")), "data": str(data), "steps": 2, "batch_size": 4}
    res = run_skill("sft", tmp_path / "runs", {**sets, "eval_limit": 4, "max_new_tokens": 2, "eval_fraction": 0.25})
    assert f"data: {data} (40 rows) -> 30 train / 10 held-out (eval_fraction 0.25, seed 0)" in log(res)
    assert (output(res, "adapter") / "adapter_config.json").is_file()


def test_evaluation_scores_one_eval_file_and_says_what_perplexity_is_on(prepared, family_model, tmp_path):
    rows = [json.loads(x) for x in (output(prepared, "eval_data") / "test.jsonl").read_text().splitlines()[:6]]
    eval_file = jsonl(tmp_path / "eval.jsonl", rows)
    base = {"model": str(family_model("llama")), "num_samples": 0, "max_new_tokens": 2}
    res = run_skill("evaluation", tmp_path / "a", {**base, "eval_data": str(eval_file)})
    report = json.loads(output(res, "report").read_text())
    assert report["n_exact_match"] == 6 and report["n_perplexity_docs"] == 6
    assert f"eval_data: scoring 6 of 6 rows of {eval_file}" in log(res)
    assert res["summary"]["perplexity_data"] == f"eval_data prompt + completion ({eval_file})"
    assert "no corpus given: perplexity is on eval_data's prompt + completion text" in log(res)
    txt = tmp_path / "held.txt"
    txt.write_text("Mira has a red kite.\n\nPip is a small dog.\n\nThe sun is warm.\n")
    res = run_skill("evaluation", tmp_path / "b", {**base, "eval_data": str(eval_file), "corpus": str(txt)})
    assert res["summary"]["perplexity_data"] == str(txt) and res["summary"]["n_perplexity_docs"] == 3
    res = run_skill("evaluation", tmp_path / "c", {**base, "max_examples": 2})
    assert res["summary"]["perplexity_data"] == "embedded synthetic world"
    assert "perplexity is on the embedded synthetic world, not your data" in log(res)


def test_pretraining_and_its_tokenizer_train_on_one_txt_corpus(prepared, tmp_path):
    from test_pretraining import SMALL

    docs = (output(prepared, "corpus") / "train.jsonl").read_text().splitlines()[:200]
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(json.loads(d)["text"] for d in docs) + "\n", encoding="utf-8")
    res = run_skill("pretraining", tmp_path / "runs", {**SMALL, "corpus": str(txt), "max_steps": 2, "warmup_steps": 1})
    note = f"corpus: {txt} (200 docs) -> 190 train / 10 held-out (val_fraction 0.05, seed 0)"
    assert note in log(res)
    assert note in (Path(res["run_dir"]) / "tokenization" / "log.txt").read_text(), "the tokenizer saw the same split"
    assert res["summary"]["final_val_loss"] is not None and (output(res, "model") / "config.json").is_file()
