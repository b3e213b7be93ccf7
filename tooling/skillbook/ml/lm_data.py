"""Language-model data: a corpus (file or folder, read by skillbook.ml.data_files) -> one flat token tensor ->
deterministic, resumable batches.

Documents are tokenised as BOS + text + EOS and concatenated (GPT-2 style packing: no padding, every
position is a training target, attention may look across a document boundary, which EOS marks). The
stream is cut into non-overlapping windows of seq_len + 1 tokens; each epoch visits them in an order
drawn from (seed, epoch). The sampler's whole state is (epoch, position), so a checkpoint that stores it
resumes on exactly the next batch, and every rank can compute the same global order without talking.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from skillbook.errors import ConfigError, SkillbookError
from skillbook.ml import data_files


def tokenize_texts(tokenizer, texts: Iterable[str], batch: int = 512):
    """One int64 tensor: BOS + ids + EOS for every text, concatenated (specials only if the tokenizer has them)."""
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    chunk: list[str] = []

    def flush() -> None:
        for row in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            ids.extend(([bos] if bos is not None else []) + row + ([eos] if eos is not None else []))
        chunk.clear()

    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    return torch.tensor(ids, dtype=torch.long)


def read_corpus_split(corpus: Path, split: str) -> list[str]:
    """The documents of a corpus folder's "train" or "val" split (train.jsonl, val.jsonl or another name and
    format skillbook.ml.data_files accepts), failing with one clear ConfigError on a malformed file."""
    lay = data_files.layout(corpus, "corpus", "corpus", need_train=split == "train")
    path = lay.file or (lay.train if split == "train" else lay.held)
    if path is None:
        raise ConfigError(f"corpus: {corpus} has no {split} split; give it a val.jsonl, or pass a single file")
    return data_files.read_texts(path)


def load_tokens(splits: dict[str, Iterable[str]], tokenizer, seq_len: int) -> dict:
    """{"train": tensor, "val": tensor} from the documents of each split; each must hold at least one window."""
    out = {}
    for split in ("train", "val"):
        out[split] = tokenize_texts(tokenizer, splits[split])
        if len(out[split]) < seq_len + 1:
            raise ConfigError(
                f"corpus: the {split} split has {len(out[split])} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}; add text, raise val_fraction (a single file) or lower seq_len"
            )
    return out


class WindowSampler:
    """Random non-overlapping windows of `seq_len + 1` tokens, epoch after epoch, with a resumable position."""

    def __init__(self, tokens, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # own generator: global RNG untouched
        return torch.randperm(self.n_windows, generator=g)

    def take(self, n: int):
        """The next `n` window indices (crossing into the next epoch when this one runs out)."""
        import torch

        got = []
        while n > 0:
            if self.pos == self.n_windows:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(n, self.n_windows - self.pos)
            got.append(self._order[self.pos : self.pos + k])
            self.pos, n = self.pos + k, n - k
        return torch.cat(got)

    def windows(self, idx):
        """(x, y) of shape [len(idx), seq_len]: y is x shifted by one token."""
        import torch

        rows = torch.stack([self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1] for i in idx.tolist()])
        return rows[:, :-1], rows[:, 1:]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.pos / self.n_windows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != self.n_windows or state["seed"] != self.seed:
            raise SkillbookError(
                "resume: the checkpoint was written for different data (window count or seed "
                "differs); start a fresh run or restore the original corpus and tokenizer"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation(self.epoch)


def rank_slice(idx, micro: int, rank: int, world: int, batch: int):
    """The rows of a global step's window indices that micro-step `micro` of `rank` trains on.

    Global step = accum x world micro-batches; this layout makes 1 process x 2 accumulation steps and
    2 processes x 1 step see exactly the same sequences in the same step.
    """
    k = micro * world + rank
    return idx[k * batch : (k + 1) * batch]


def eval_windows(tokens, seq_len: int, max_windows: int):
    """The first `max_windows` non-overlapping windows, in order: the same validation set every time."""
    import torch

    n = min(max_windows, (len(tokens) - 1) // seq_len)
    rows = torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    return rows[:, :-1], rows[:, 1:]
