"""Data for the post-training recipes (sft, dpo, reward-modeling, grpo): jsonl splits checked before
any model is loaded, the embedded synthetic sets as the default, and chat-template rendering.

Every problem is a ConfigError naming the config field, the file, the line and the column, so a bad
file fails in a second instead of after the model has loaded. Heavy libraries load inside functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from skillbook.errors import ConfigError
from skillbook.run.recipe import artifact_path


def default_data(ctx: Any, key: str) -> Path:
    """The embedded synthetic data (written under the run dir) for `key` in write_default_data's result."""
    from skillbook.ml.synthetic import write_default_data

    return Path(write_default_data(ctx.out_dir / "data")[key])


def artifact_dir(ref: str | Path, field: str) -> Path:
    """An existing input directory, or ConfigError naming the field."""
    path = artifact_path(ref, field)
    if not path.is_dir():
        raise ConfigError(f"{field}: {path} is a file; pass the directory that holds train.jsonl/test.jsonl")
    return path


def question_dirs(ctx: Any, data: str | None, eval_data: str | None) -> tuple[Path, Path]:
    """(train dir, held-out dir) of prompt/completion data: the embedded sets when `data` is None,
    else `data` with `eval_data` (or `data`'s own test split) for the held-out rows."""
    if data is None:
        return default_data(ctx, "sft_data"), Path(eval_data) if eval_data else default_data(ctx, "eval_data")
    data_dir = artifact_dir(data, "data")
    return data_dir, Path(eval_data) if eval_data else data_dir


def read_split(data_dir: Path | str, split: str, columns: tuple[str, ...], field: str) -> list[dict]:
    """Rows of `<data_dir>/<split>.jsonl`; every row must hold non-empty string `columns`.

    Raises ConfigError naming the config field, the file, the line and the missing column.
    """
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"{field}: {path} does not exist; a {field} directory needs {split}.jsonl "
            f"with one JSON object per line holding {', '.join(repr(c) for c in columns)}"
        )
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{field}: {path}:{lineno} is not valid JSON ({exc.msg})") from None
            missing = [c for c in columns if not isinstance(row, dict) or c not in row]
            if missing:
                raise ConfigError(
                    f"{field}: {path}:{lineno} has no {missing[0]!r} column; each row needs "
                    f"{', '.join(repr(c) for c in columns)}"
                )
            bad = [c for c in columns if not isinstance(row[c], str)]
            if bad:
                raise ConfigError(f"{field}: {path}:{lineno} column {bad[0]!r} must be a string")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{field}: {path} has no rows")
    return rows


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
