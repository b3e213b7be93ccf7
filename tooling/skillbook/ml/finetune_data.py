"""Data for the post-training recipes (sft, dpo, reward-modeling, grpo): the user's file or folder (read by
skillbook.ml.data_files: jsonl/json/parquet, split by a seeded fraction when it has no held-out part), the
embedded synthetic sets as the default, and chat-template rendering.

Every problem is a ConfigError naming the config field, the file and the line, so a bad file fails in a
second instead of after the model has loaded. Each loader logs which rows train and which are held out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skillbook.ml.data_files import load_held_out, load_splits, read_rows

QA = ("prompt", "completion")


def default_data(ctx: Any, key: str) -> Path:
    """The embedded synthetic data (written under the run dir) for `key` in write_default_data's result."""
    from skillbook.ml.synthetic import write_default_data

    return Path(write_default_data(ctx.out_dir / "data")[key])


def held_out_rows(ctx: Any, ref: str | Path, fld: str, columns: tuple[str, ...] = QA) -> list[dict]:
    """Every row of an eval file, or an eval folder's held-out split (test.jsonl, eval.jsonl, ...), logged."""
    got = load_held_out(ref, fld, columns)
    ctx.info(got.note)
    return got.held


def question_rows(
    ctx: Any, data: str | None, eval_data: str | None, fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt/completion rows: the embedded sets when `data` is None; else `data`, whose
    held-out part (its test split, or a seeded `fraction` of a single file) is used unless `eval_data` is given."""
    if data is None:
        train = read_rows(default_data(ctx, "sft_data") / "train.jsonl", "data", QA)
        ctx.info(f"data: the embedded synthetic world ({len(train):,} rows) train")
        if eval_data is None:
            held = read_rows(default_data(ctx, "eval_data") / "test.jsonl", "eval_data", QA)
            ctx.info(f"eval_data: the embedded synthetic held-out set ({len(held):,} rows)")
            return train, held
        return train, held_out_rows(ctx, eval_data, "eval_data")
    got = load_splits(data, "data", QA, fraction, seed, split=eval_data is None)
    ctx.info(got.note)
    return got.train, (held_out_rows(ctx, eval_data, "eval_data") if eval_data else got.held)


def pair_rows(
    ctx: Any, data: str | None, fraction: float, seed: int, columns: tuple[str, ...]
) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference pairs: the embedded pairs when `data` is None, else `data`'s test split or
    a seeded `fraction` of a single file."""
    if data is None:
        folder = default_data(ctx, "preference_data")
        train, held = (
            read_rows(folder / "train.jsonl", "data", columns),
            read_rows(folder / "test.jsonl", "data", columns),
        )
        ctx.info(f"data: the embedded synthetic pairs ({len(train):,} train / {len(held):,} held-out)")
        return train, held
    got = load_splits(data, "data", columns, fraction, seed)
    ctx.info(got.note)
    return got.train, got.held


def to_dataset(rows: list[dict], columns: tuple[str, ...]):
    """A datasets.Dataset holding only `columns` (extra keys such as 'kind' would confuse TRL's format sniffing)."""
    from datasets import Dataset

    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns})


def render_chat(tok, rows: list[dict]) -> list[dict]:
    """Rows rendered as one user turn + the assistant's answer, the way the chat template writes them.

    The template already writes bos; the tokenizer adds another when it encodes the string, so the
    rendered bos is dropped here (a doubled bos is a classic silent chat-template bug).
    """
    out = []
    for row in rows:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        if tok.bos_token and prompt.startswith(tok.bos_token) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
            prompt = prompt[len(tok.bos_token) :]
        new = {**row, "prompt": prompt}
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                new[key] = row[key].strip()
        out.append(new)
    return out
