"""Data where the user has it: a `data`, `eval_data` or `corpus` value is one file or a folder of splits.

Formats: `.jsonl` (one JSON object per line), `.json` (a list of objects, or {"data": [...]}), `.parquet`
(read with pyarrow), and for corpora also `.txt` (one document per blank-line-separated paragraph; a file
with no blank line is one document per line). Rows of a corpus hold a string "text"; rows of data hold
the recipe's string columns ({prompt, completion} or {prompt, chosen, rejected}).

A folder holds one file per split, named `<split>.<ext>`: `train` for training, and the first of
HELD_OUT_NAMES for the held-out rows (test/eval/validation/val/valid for data, val/validation/valid/test/eval
for a corpus), so today's train.jsonl + test.jsonl (data) and train.jsonl + val.jsonl (corpus) keep working.
A single file, or a folder with only a train split, is split by a seeded fraction: shuffled indices with
`random.Random(seed)`, the held-out share rounded (at least 1 row), both parts kept in file order.

Every problem is one ConfigError naming the field, the file (and line) and the fix. `check_layout` only
looks at names (it runs in the Config, so `--dry-run` refuses a bad path too); `load_*` read every row
before any model is loaded. Nothing here imports a heavy library at module level.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ValidationInfo
from pydantic_core import PydanticCustomError

from skillbook.errors import ConfigError

Kind = Literal["data", "corpus"]
ROW_SUFFIXES = (".jsonl", ".json", ".parquet")
SUFFIXES: dict[Kind, tuple[str, ...]] = {"data": ROW_SUFFIXES, "corpus": (*ROW_SUFFIXES, ".txt")}
HELD_OUT_NAMES: dict[Kind, tuple[str, ...]] = {
    "data": ("test", "eval", "validation", "val", "valid"),
    "corpus": ("val", "validation", "valid", "test", "eval"),
}


@dataclass
class Layout:
    """Where the rows are: one `file` (split by fraction when a held-out part is needed), or a folder's files."""

    path: Path
    file: Path | None = None
    train: Path | None = None
    held: Path | None = None


@dataclass
class Splits:
    """Rows (dicts) or texts (str) for training and held out, and the log line that says where each came from."""

    train: list = field(default_factory=list)
    held: list = field(default_factory=list)
    note: str = ""
    held_source: str = ""


# ---------------------------------------------------------------------------------------------
# Layout: names only, cheap enough for a pydantic validator
# ---------------------------------------------------------------------------------------------


def _exts(kind: Kind) -> str:
    return "/".join(SUFFIXES[kind])


def _split_file(folder: Path, names: tuple[str, ...], kind: Kind, fld: str) -> Path | None:
    """The file of the first name in `names` that exists in `folder` (two extensions of one name: ambiguous)."""
    for name in names:
        found = [folder / f"{name}{s}" for s in SUFFIXES[kind] if (folder / f"{name}{s}").is_file()]
        if len(found) > 1:
            raise ConfigError(
                f"{fld}: {folder} holds both {found[0].name} and {found[1].name}; keep one of them, or pass the file"
            )
        if found:
            return found[0]
    return None


def layout(ref: str | Path, fld: str, kind: Kind, need_train: bool) -> Layout:
    """Resolve a file or folder. need_train: the recipe trains on it (a folder needs `train.*`);
    otherwise it only scores held-out rows (a folder needs one of HELD_OUT_NAMES)."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{fld}: {path} does not exist; pass a {_exts(kind)} file or a folder of them, or omit it "
            f"for the embedded synthetic data"
        )
    if path.is_file():
        if path.suffix not in SUFFIXES[kind]:
            raise ConfigError(
                f"{fld}: {path} has unsupported type {path.suffix or '(no extension)'!r}; use {_exts(kind)}"
                + (" (.txt is read only for a corpus)" if path.suffix == ".txt" else "")
            )
        return Layout(path, file=path)
    held = _split_file(path, HELD_OUT_NAMES[kind], kind, fld)
    train = _split_file(path, ("train",), kind, fld) if need_train else None
    canonical = "train.jsonl and " + ("test.jsonl" if kind == "data" else "val.jsonl")
    if need_train and train is None:
        raise ConfigError(
            f"{fld}: {path} has no train{'/'.join(SUFFIXES[kind])} file; a {fld} folder holds {canonical} "
            f"(or pass one file: it is split by a fraction)"
        )
    if not need_train and held is None:
        names = "/".join(HELD_OUT_NAMES[kind])
        raise ConfigError(
            f"{fld}: {path} has no held-out file ({names} with {_exts(kind)}); pass the folder an earlier run "
            f"wrote, or the file itself (every row of a file is scored)"
        )
    return Layout(path, train=train, held=held)


def check_layout(kind: Kind, need_train: bool):
    """A pydantic AfterValidator: a path that exists must have a usable layout. A missing path or a
    pipeline reference is left to the runner's input check, which names every missing input at once."""

    def check(value: str | None, info: ValidationInfo) -> str | None:
        if value is None or "${" in value or not Path(value).expanduser().exists():
            return value
        try:
            layout(value, str(info.field_name), kind, need_train)
        except ConfigError as exc:
            detail = str(exc).split(": ", 1)[1]  # the field name is added by the config error's own format
            raise PydanticCustomError("data_layout", "{detail}", {"detail": detail}) from None
        return value

    return AfterValidator(check)


# Annotated types for recipe Config fields: `data: DataPath | None = Field(None, description=...)`.
DataPath = Annotated[str, check_layout("data", need_train=True)]
EvalDataPath = Annotated[str, check_layout("data", need_train=False)]
CorpusPath = Annotated[str, check_layout("corpus", need_train=True)]
EvalCorpusPath = Annotated[str, check_layout("corpus", need_train=False)]


# ---------------------------------------------------------------------------------------------
# Reading one file
# ---------------------------------------------------------------------------------------------


def _text(path: Path, fld: str) -> str:
    """The file as UTF-8 text; binary junk or another encoding is one clear error, never a traceback."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{fld}: {path}:{line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            f"save it as UTF-8, or check that it is the file you meant"
        ) from None
    if "\x00" in text:
        raise ConfigError(f"{fld}: {path} looks binary (a NUL byte at offset {text.index(chr(0))}); pass a text file")
    return text.removeprefix("\ufeff")


def iter_records(path: Path, fld: str) -> Iterator[tuple[str, Any]]:
    """(location, row) for every row of a .jsonl/.json/.parquet file; location is `path:line` or `path[row]`."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise ConfigError(f"{fld}: {path} is not a readable Parquet file ({str(exc)[:160]})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}[row {i}]", row
        return
    text = _text(path, fld)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{fld}: {path}:{exc.lineno} is not valid JSON ({exc.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ConfigError(f'{fld}: {path} must hold a JSON list of objects (or {{"data": [...]}})')
        yield from ((f"{path}[row {i}]", row) for i, row in enumerate(data))
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{fld}: {path}:{n} is not valid JSON ({exc.msg}); each line must be one JSON object"
            ) from None


def checked_row(where: str, row: Any, columns: tuple[str, ...], fld: str) -> dict:
    """`row` if it is an object whose `columns` are strings; ConfigError naming the location otherwise."""
    need = ", ".join(repr(c) for c in columns)
    if not isinstance(row, dict):
        raise ConfigError(f"{fld}: {where} is a JSON {type(row).__name__}, not an object; each row needs {need}")
    missing = [c for c in columns if c not in row]
    if missing:
        got = ", ".join(map(repr, row)) or "none"
        raise ConfigError(f"{fld}: {where} has no {missing[0]!r} column (got {got}); each row needs {need}")
    bad = [c for c in columns if not isinstance(row[c], str)]
    if bad:
        raise ConfigError(f"{fld}: {where} column {bad[0]!r} must be a string (got {type(row[bad[0]]).__name__})")
    return row


def read_rows(path: Path, fld: str, columns: tuple[str, ...]) -> list[dict]:
    """Every row of one data file, each holding string `columns`; an empty file is an error."""
    rows = [checked_row(where, row, columns, fld) for where, row in iter_records(path, fld)]
    if not rows:
        raise ConfigError(f"{fld}: {path} has no rows; each row needs {', '.join(repr(c) for c in columns)}")
    return rows


def iter_texts(path: Path, fld: str = "corpus", limit: int | None = None) -> Iterator[str]:
    """The documents of one corpus file, streamed (at most `limit`): "text" of each row, or .txt paragraphs."""
    if path.suffix == ".txt":
        text = _text(path, fld).replace("\r\n", "\n")
        docs = [p.strip("\n") for p in re.split(r"\n(?:[ \t]*\n)+", text) if p.strip()]
        if len(docs) == 1:  # no blank line anywhere: one document per line
            docs = [line for line in text.split("\n") if line.strip()]
        texts: Iterator[str] = iter(docs)
    else:
        texts = (checked_row(w, row, ("text",), fld)["text"] for w, row in iter_records(path, fld))
    for n, doc in enumerate(texts):
        if limit is not None and n >= limit:
            return
        yield doc


def read_texts(path: Path, fld: str = "corpus") -> list[str]:
    """Every document of one corpus file; an empty file is an error."""
    docs = list(iter_texts(path, fld))
    if not docs:
        raise ConfigError(f'{fld}: {path} has no documents; give it {{"text": ...}} rows or non-empty .txt lines')
    return docs


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def split_by_fraction(items: list, fraction: float, seed: int, fld: str, path: Path) -> tuple[list, list]:
    """(train, held-out): a seeded `fraction` of the items held out (at least 1), both parts in file order."""
    if len(items) < 2:
        raise ConfigError(
            f"{fld}: {path} has {len(items)} row; a held-out split needs at least 2 rows (add rows, or pass a "
            f"separate held-out file)"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _load(lay: Layout, fld: str, columns: tuple[str, ...] | None) -> tuple[list, list]:
    read = (lambda p: read_texts(p, fld)) if columns is None else (lambda p: read_rows(p, fld, columns))
    if lay.file is not None:
        return read(lay.file), []
    return (read(lay.train) if lay.train else []), (read(lay.held) if lay.held else [])


def load_splits(
    ref: str | Path,
    fld: str,
    columns: tuple[str, ...] | None,
    fraction: float,
    seed: int,
    split: bool = True,
    fraction_name: str = "eval_fraction",
) -> Splits:
    """Training and held-out rows (or texts when `columns` is None) of a file or folder. A file, or a folder
    without a held-out split, is split by `fraction` when `split` (False: every row trains)."""
    kind: Kind = "corpus" if columns is None else "data"
    lay = layout(ref, fld, kind, need_train=True)
    train, held = _load(lay, fld, columns)
    unit = "docs" if columns is None else "rows"
    source = lay.file or lay.train
    assert source is not None
    if not split:
        return Splits(train, [], f"{fld}: {source} ({len(train):,} {unit}) -> all {len(train):,} train")
    if lay.held is not None:
        note = f"{fld}: {lay.train} ({len(train):,} {unit}) train / {lay.held} ({len(held):,} {unit}) held-out"
        return Splits(train, held, note, str(lay.held))
    total = len(train)
    train, held = split_by_fraction(train, fraction, seed, fld, source)
    how = f"{fraction_name} {fraction:g}, seed {seed}"
    note = f"{fld}: {source} ({total:,} {unit}) -> {len(train):,} train / {len(held):,} held-out ({how})"
    return Splits(train, held, note, f"{source} (held-out by {how})")


def load_held_out(ref: str | Path, fld: str, columns: tuple[str, ...] | None) -> Splits:
    """Held-out rows to score: every row of a file, or a folder's held-out split (`Splits.held`)."""
    lay = layout(ref, fld, "corpus" if columns is None else "data", need_train=False)
    path = lay.file or lay.held
    assert path is not None
    held = read_texts(path, fld) if columns is None else read_rows(path, fld, columns)
    unit = "docs" if columns is None else "rows"
    return Splits([], held, f"{fld}: {path} ({len(held):,} {unit}) held-out", str(path))


class TextFile:
    """Every document of one corpus file, re-read on each iteration (a large corpus never sits in memory)."""

    def __init__(self, path: Path, fld: str = "corpus"):
        self.path, self.fld = path, fld

    def __iter__(self) -> Iterator[str]:
        return iter_texts(self.path, self.fld)


def corpus_sources(ref: str | Path, fld: str, fraction: float, seed: int) -> tuple[Any, list[str], str]:
    """(train texts, val texts, log line) of a corpus. A folder's train split is streamed (a TextFile,
    checked in one pass here, so a bad line fails now, not halfway through training); a file is split."""
    lay = layout(ref, fld, "corpus", need_train=True)
    if lay.train is None or lay.held is None:
        s = load_splits(ref, fld, None, fraction, seed, fraction_name="val_fraction")
        return s.train, s.held, s.note
    train = TextFile(lay.train, fld)
    n_train = sum(1 for _ in train)
    if not n_train:
        raise ConfigError(f'{fld}: {lay.train} has no documents; give it {{"text": ...}} rows')
    val = read_texts(lay.held, fld)
    return train, val, f"{fld}: {lay.train} ({n_train:,} docs) train / {lay.held} ({len(val):,} docs) held-out"
