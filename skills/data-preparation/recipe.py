"""data-preparation: build the corpus, SFT, preference and held-out eval sets every later stage trains on.

Default: the embedded synthetic world (skillbook.ml.synthetic), no network. With `source` set, the
corpus comes from local .txt/.jsonl/.parquet files (or a hub dataset when online) and goes through
the same cleaning: Unicode NFC + whitespace normalisation, a minimum length, exact dedup, MinHash
near dedup. Output files are byte-identical for the same config: no timestamps, no set ordering.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from skillbook.errors import SkillbookError
from skillbook.run.recipe import RecipeConfig
from skillbook.run.runner import RunContext

OUTPUTS = {"corpus": "corpus", "sft_data": "sft-data", "preference_data": "preference-data", "eval_data": "sft-data"}
INPUTS: dict[str, str] = {}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class Config(RecipeConfig):
    seed: int = Field(0, description="Seed of the synthetic world and of the train/val split; same seed, same bytes.")
    n_people: int = Field(32, ge=4, le=40, description="People in the synthetic world (each has a pet): 9 facts each.")
    repeats: int = Field(
        40,
        ge=1,
        le=1000,
        description="How many times the corpus states each person fact on "
        "average (in varied phrasings); 40 gives ~3.5k documents, ~400 kB of text.",
    )
    max_operand: int = Field(9, ge=1, le=30, description="Arithmetic facts use operands 0..max_operand (plus, minus).")
    reading_questions: bool = Field(
        True,
        description="Also emit each question with a two-sentence passage (the "
        "fact + a same-type distractor) in front: kind 'reading', learnable by copying.",
    )
    source: str | None = Field(
        None,
        description="None = embedded synthetic world; else a local .txt/.jsonl/.parquet "
        "file or a folder of them, or 'hub:<dataset>' (needs network) for the corpus.",
    )
    text_field: str = Field(
        "text", min_length=1, description="Field holding the document text in .jsonl/.parquet/hub rows."
    )
    txt_split: str = Field(
        "paragraph",
        pattern="^(paragraph|line|file)$",
        description="How a .txt file is cut into "
        "documents: 'paragraph' (blank-line separated), 'line', or the whole 'file'.",
    )
    hub_split: str = Field("train", description="Split of the hub dataset to stream.")
    max_documents: int | None = Field(
        None,
        ge=1,
        description="Read at most this many documents from `source` (required for hub sources, which are streamed).",
    )
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="Fraction of corpus documents held out as val.jsonl.")
    min_chars: int = Field(
        20, ge=0, description="Drop documents shorter than this many characters after normalisation."
    )
    dedup: bool = Field(True, description="Remove exact duplicates (sha1 of the normalised text).")
    near_dedup: bool = Field(True, description="Also remove near duplicates with MinHash + LSH (needs dedup).")
    minhash_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Jaccard similarity above which two documents count as near duplicates (FineWeb uses ~0.75-0.8).",
    )
    minhash_num_perm: int = Field(
        128,
        ge=16,
        le=1024,
        description="MinHash permutations: more = finer Jaccard "
        "estimate, slower (128 gives about +-0.04 standard error).",
    )
    shingle_size: int = Field(5, ge=1, le=20, description="Word n-gram length of the shingles MinHash compares.")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str | None) -> str | None:
        # Checked here so a bad path fails before any run directory exists.
        if v is None:
            return v
        if v.startswith("hub:"):
            if not v[4:]:
                raise ValueError("write the dataset name after 'hub:', e.g. hub:roneneldan/TinyStories")
            if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
                raise ValueError(
                    f"{v} needs the Hugging Face hub but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; "
                    "download it once and pass the local .jsonl/.parquet path instead"
                )
            return v
        path = Path(v).expanduser()
        if not path.exists():
            raise ValueError(
                f"{path} does not exist; pass a .txt/.jsonl/.parquet file or folder, "
                "'hub:<name>', or omit it for the embedded synthetic world"
            )
        if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
        return v

    @model_validator(mode="after")
    def _hub_needs_limit(self) -> Config:
        if self.source and self.source.startswith("hub:") and self.max_documents is None:
            raise ValueError("a hub source is streamed: set max_documents (e.g. 20000)")
        return self


# ---------------------------------------------------------------------------------------------
# Reading a corpus source
# ---------------------------------------------------------------------------------------------


def read_local(path: Path, cfg: Config) -> list[str]:
    """Documents from one file or every supported file under a folder (sorted, so order is stable)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise SkillbookError(f"source: {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    docs: list[str] = []
    for f in files:
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            parts = {"file": [text], "line": text.splitlines(), "paragraph": re.split(r"\n\s*\n", text)}[cfg.txt_split]
            docs += [p for p in parts if p.strip()]
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(f)
            if cfg.text_field not in table.column_names:
                raise SkillbookError(
                    f"source: {f} has no column '{cfg.text_field}' (columns: "
                    f"{', '.join(table.column_names)}); set text_field"
                )
            docs += [str(t) for t in table.column(cfg.text_field).to_pylist() if t]
        else:
            for where, row in _json_rows(f):
                if not isinstance(row, dict) or cfg.text_field not in row:
                    fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise SkillbookError(
                        f"source: {where} has no field '{cfg.text_field}' (got {fields}); set text_field"
                    )
                docs.append(str(row[cfg.text_field]))
        if cfg.max_documents and len(docs) >= cfg.max_documents:
            break
    return docs[: cfg.max_documents]


def _json_rows(f: Path):
    """(location, row) pairs of a .jsonl file, or of a .json file holding one list of rows."""
    text = f.read_text(encoding="utf-8")
    try:
        if f.suffix == ".json":
            data = json.loads(text)
            yield from ((f"{f}[{i}]", row) for i, row in enumerate(data if isinstance(data, list) else [data]))
            return
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield f"{f}:{n}", json.loads(line)
    except json.JSONDecodeError as exc:
        raise SkillbookError(
            f"source: {f} is not valid JSON{' lines' if f.suffix == '.jsonl' else ''} ({exc.msg} at line {exc.lineno})"
        ) from None


def read_hub(name: str, cfg: Config) -> list[str]:
    """Stream the first max_documents rows of a hub dataset (no full download)."""
    from datasets import load_dataset

    try:
        stream = load_dataset(name, split=cfg.hub_split, streaming=True)
        return [str(row[cfg.text_field]) for row in stream.take(cfg.max_documents)]
    except KeyError:
        raise SkillbookError(f"source: hub:{name} rows have no field '{cfg.text_field}'; set text_field") from None
    except Exception as exc:  # noqa: BLE001 - offline, missing or gated: datasets raises many types, all reported
        raise SkillbookError(
            f"source: cannot stream hub:{name} ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the name and network, or pass a local file"
        ) from None


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    from skillbook.ml import synthetic, textclean

    ctx.progress(3, "data-preparation")
    # ---- 1. the world: always generated, it supplies the SFT / preference / eval sets ----------
    ds = synthetic.generate(
        cfg.seed, n_people=cfg.n_people, repeats=cfg.repeats, max_operand=cfg.max_operand, reading=cfg.reading_questions
    )
    if cfg.source is None:
        raw, source = ds.corpus, "embedded synthetic world"
    elif cfg.source.startswith("hub:"):
        raw, source = read_hub(cfg.source[4:], cfg), cfg.source
    else:
        raw, source = read_local(Path(cfg.source).expanduser(), cfg), cfg.source
    if cfg.source is not None:
        ctx.info(
            f"corpus from {source}; sft-data, preference-data and eval are still the embedded synthetic "
            "sets (their facts are not in this corpus, so they measure format learning only)"
        )
    ctx.info(f"read {len(raw)} documents from {source}")
    ctx.log(step=1, documents_in=len(raw))

    # ---- 2. clean: normalise -> length filter -> exact dedup -> MinHash near dedup -------------
    docs, cs = textclean.clean(
        raw,
        dedup=cfg.dedup,
        near_dedup=cfg.near_dedup,
        threshold=cfg.minhash_threshold,
        num_perm=cfg.minhash_num_perm,
        ngram=cfg.shingle_size,
        min_chars=cfg.min_chars,
    )
    if not docs:
        raise SkillbookError(
            f"no documents left after cleaning {len(raw)} from {source}; lower min_chars "
            f"(now {cfg.min_chars}) or check text_field"
        )
    ctx.info(
        f"cleaning: {cs.too_short} too short, {cs.exact_duplicates} exact and {cs.near_duplicates} near "
        f"duplicates removed, {len(docs)} documents kept"
    )
    ctx.log(step=2, **cs.as_dict())

    # ---- 3. write artifacts: corpus train/val, then the supervised sets ----------------------
    corpus_dir = synthetic.write_corpus(docs, ctx.out_dir / "corpus", cfg.val_fraction, cfg.seed)
    out = {"corpus": corpus_dir, **synthetic.write_supervised(ds, ctx.out_dir)}
    splits = {
        f"{name}/{f.stem}": sum(1 for _ in open(f, encoding="utf-8"))
        for name, d in out.items()
        for f in sorted(d.glob("*.jsonl"))
    }

    # Split hygiene: no held-out question may appear verbatim in the corpus.
    text = "\n".join(docs)
    held = [r["prompt"] for r in ds.eval + ds.sft["test"]]
    leaked = sum(1 for p in held if p.split("Question: ", 1)[1].split("\n")[0] in text)
    stats = {
        "source": source,
        **synthetic.text_stats(docs),
        "cleaning": cs.as_dict(),
        "exact_duplicates_removed": cs.exact_duplicates,
        "near_duplicates_removed": cs.near_duplicates,
        "splits": splits,
        "held_out_questions_in_corpus": leaked,
        "near_duplicate_examples": cs.examples,
    }
    (ctx.out_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    ctx.log(step=3, held_out_questions_in_corpus=leaked)
    for key in ("documents", "characters", "words", "distinct_words"):
        ctx.summary[key] = stats[key]
    ctx.summary.update(
        exact_duplicates_removed=cs.exact_duplicates,
        near_duplicates_removed=cs.near_duplicates,
        sft_train=splits["sft_data/train"],
        eval_rows=splits["eval_data/test"],
        held_out_questions_in_corpus=leaked,
    )
    ctx.report(render_report(stats))
    return out


def render_report(stats: dict) -> str:
    """report.md: what went in, what cleaning removed, what came out (no paths or times: reproducible)."""
    c = stats["cleaning"]
    lines = [
        "# data-preparation",
        "",
        f"Source: {stats['source']}",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {stats[k]} |" for k in ("documents", "characters", "words", "distinct_words")],
        *[f"| {k.replace('_', ' ')} | {v} |" for k, v in c.items()],
        f"| held-out questions found in corpus | {stats['held_out_questions_in_corpus']} |",
        "",
        "| split | rows |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in stats["splits"].items()],
    ]
    for ex in stats["near_duplicate_examples"]:
        lines += [
            "",
            f"Near duplicate (Jaccard {ex['jaccard']}):",
            "",
            f"- removed: {ex['removed'][:200]}",
            f"- kept: {ex['kept'][:200]}",
        ]
    return "\n".join(lines) + "\n"
