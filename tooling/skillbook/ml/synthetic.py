"""A seeded synthetic world: the embedded default data every Skillbook recipe trains on.

The world is a small village: people with a home town, job, age, favourite food, a coloured
object and a pet (with its own species and colour), plus single-digit arithmetic. From it we
emit four artifacts that let each training stage show a held-out gain:

- corpus           prose documents that state every fact in several phrasings (no Q/A format);
- sft-data         "Question: ...\\nAnswer:" -> " <word>" rows for the *train*/*test* facts;
- preference-data  the same prompts with the correct answer and a wrong one of the kinds a small model
                   gets wrong: another value of the same type, the name asked about, or a wrong-type value;
- eval             questions about the *eval* facts: stated in the corpus, asked in no training split.

Facts (an entity + attribute pair, or an arithmetic pair) are split once into train / test /
eval buckets, so SFT has to learn the answer *format* and recall facts from pretraining rather
than memorise rows. Everything is driven by one `random.Random(seed)`: same seed, same bytes.

The parts: `synthetic_vocab` (word lists and templates), `synthetic_world` (people, facts, splits),
`synthetic_corpus` (the prose), `synthetic_questions` (SFT rows and preference pairs); this module
assembles the `Dataset` and writes it as JSONL artifacts.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from skillbook.ml.synthetic_corpus import make_corpus
from skillbook.ml.synthetic_questions import as_preference, as_sft, question_rows
from skillbook.ml.synthetic_world import World, make_world

# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Everything the generator emits, in memory."""

    world: World
    corpus: list[str]
    sft: dict[str, list[dict]]
    preference: dict[str, list[dict]]
    eval: list[dict]


def generate(
    seed: int = 0, n_people: int = 32, repeats: int = 40, max_operand: int = 9, reading: bool = True
) -> Dataset:
    """The whole synthetic dataset for `seed`: corpus, sft train/test, preference train/test, eval."""
    world = make_world(seed, n_people=n_people, max_operand=max_operand)
    rng = random.Random(seed * 104729 + 2)
    train, test, held = (
        question_rows(world, world.facts_in(b), rng, b != "eval", reading) for b in ("train", "test", "eval")
    )
    # Shuffle every split so any prefix (e.g. "the first 50 eval rows") mixes all question types.
    for rows in (train, test, held):
        rng.shuffle(rows)
    return Dataset(
        world,
        make_corpus(world, repeats),
        {"train": as_sft(train), "test": as_sft(test)},
        {"train": as_preference(train), "test": as_preference(test)},
        as_sft(held, kind=True),
    )


# ---------------------------------------------------------------------------------------------
# Writing artifacts
# ---------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, keys in insertion order (byte-stable).

    Written to a temporary name, then renamed into place: every rank of a multi-process run writes the same
    embedded data to the same path, and a reader must never see another rank's half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def split_corpus(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/val split of documents (at least one val document)."""
    order = list(range(len(docs)))
    random.Random(seed * 31 + 3).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction)) if len(docs) > 1 else 0
    val_idx = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx]


def write_supervised(ds: Dataset, out_dir: Path) -> dict[str, Path]:
    """Write sft-data, preference-data and eval directories under `out_dir`."""
    out = {
        "sft_data": out_dir / "sft-data",
        "preference_data": out_dir / "preference-data",
        "eval_data": out_dir / "eval",
    }
    for split, rows in ds.sft.items():
        write_jsonl(out["sft_data"] / f"{split}.jsonl", rows)
    for split, rows in ds.preference.items():
        write_jsonl(out["preference_data"] / f"{split}.jsonl", rows)
    write_jsonl(out["eval_data"] / "test.jsonl", ds.eval)
    return out


def write_corpus(docs: list[str], out_dir: Path, val_fraction: float = 0.05, seed: int = 0) -> Path:
    """Write `out_dir/train.jsonl` and `out_dir/val.jsonl` with {"text"} rows."""
    train, val = split_corpus(docs, val_fraction, seed)
    write_jsonl(out_dir / "train.jsonl", [{"text": d} for d in train])
    write_jsonl(out_dir / "val.jsonl", [{"text": d} for d in val])
    return out_dir


def write_default_data(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Generate the default world and write {"corpus", "sft_data", "preference_data", "eval_data"} dirs."""
    out_dir = Path(out_dir)
    ds = generate(seed)
    paths = {"corpus": write_corpus(ds.corpus, out_dir / "corpus", seed=seed)}
    paths.update(write_supervised(ds, out_dir))
    return paths


def text_stats(docs: list[str]) -> dict[str, int]:
    """Documents, characters, words and distinct words (lower-cased, punctuation stripped)."""
    words = [w.strip(".,?!'\"").lower() for d in docs for w in d.split()]
    return {
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "words": len(words),
        "distinct_words": len({w for w in words if w}),
    }
