"""Byte-level BPE from scratch: the algorithm behind GPT-2, Llama-3 and HF `tokenizers`, in one file.

Teaching code, not production code (use `tokenizers` for that). It is written to learn the *same*
merges as `tokenizers.trainers.BpeTrainer` with a `ByteLevel(add_prefix_space=False)` pre-tokenizer
and the 256-byte initial alphabet, so tests/test_tokenization.py can check it merge for merge.
Walk-through: skills/tokenization/references/bpe-from-scratch.md.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import regex  # the `regex` package: Python's `re` has no \p{L} (any letter) or \p{N} (any digit)

# ---- 1. pre-tokenisation ---------------------------------------------------------------------------
# Split text into "words" first, so merges never cross them: contractions, letter runs, digit runs,
# punctuation runs, each taking at most one leading space. Whitespace before a word stays with it
# (" world"), except the last space of a longer run, which goes to the next word. This is the GPT-2
# pattern, exactly as HF `ByteLevel` uses it.
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes map to themselves, the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:  # control bytes, space, etc. get a visible stand-in: space -> 'Ġ', newline -> 'Ċ'
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def pretokenize(text: str) -> list[str]:
    """Regex-split `text`, then spell each piece's UTF-8 bytes with one visible character per byte."""
    return ["".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8")) for piece in GPT2_PATTERN.findall(text)]


# ---- 2. training -----------------------------------------------------------------------------------
@dataclass
class ByteBPE:
    """A trained tokenizer: token string -> id, and merges in the order they were learned."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    ranks: dict[tuple[str, str], int] = field(init=False)

    def __post_init__(self) -> None:
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.id_to_token = {i: t for t, i in self.vocab.items()}

    # ---- 3. encoding / decoding --------------------------------------------------------------------
    def encode_word(self, word: str) -> list[str]:
        """Apply learned merges to one pre-token, always the earliest-learned (lowest-rank) pair first."""
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(p, len(self.ranks)), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == len(self.ranks):  # no learnable pair left in this word
                break
            a, b = self.merges[rank]
            merged, i = [], 0
            while i < len(parts):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        return [self.vocab[t] for word in pretokenize(text) for t in self.encode_word(word)]

    def decode(self, ids: Iterable[int]) -> str:
        raw = bytes(CHAR_TO_BYTE[c] for i in ids for c in self.id_to_token[i])
        return raw.decode("utf-8", errors="replace")  # a cut inside a multi-byte char shows as U+FFFD


def train(texts: Iterable[str], vocab_size: int, min_frequency: int = 0) -> ByteBPE:
    """Learn merges until the vocabulary has `vocab_size` entries or no pair occurs `min_frequency` times."""
    # Count distinct pre-tokens once: "the" appearing 10,000 times is one word with weight 10,000.
    word_counts = Counter(w for text in texts for w in pretokenize(text))

    # The 256 byte characters are the starting vocabulary, sorted by code point as HF does; ids are
    # what the tie-break below compares, so this order matters for agreeing with HF merge for merge.
    id_to_token = sorted(BYTE_TO_CHAR.values())
    vocab = {t: i for i, t in enumerate(id_to_token)}
    words = [[vocab[c] for c in w] for w in word_counts]
    counts = list(word_counts.values())

    # How often each adjacent pair occurs (weighted by word count), and in which words.
    pair_counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += counts[wi]
            where[pair].add(wi)

    # Max-heap of (count, pair) with lazy updates: an entry whose count went stale is re-pushed with
    # the current count. Ties go to the smaller pair of ids, i.e. (-count, a, b) ascending -- HF's rule.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(vocab) < vocab_size:
        neg, pair = heapq.heappop(heap)
        if -neg != pair_counts[pair]:
            heapq.heappush(heap, (-pair_counts[pair], pair))
            continue
        if -neg < max(min_frequency, 1):  # the best pair is too rare: stop early, vocab stays smaller
            break
        a, b = pair
        token = id_to_token[a] + id_to_token[b]
        if token not in vocab:  # two different splits can spell the same string; it keeps one id
            vocab[token] = len(id_to_token)
            id_to_token.append(token)
        new = vocab[token]
        merges.append((id_to_token[a], id_to_token[b]))

        # Rewrite each word containing the pair and record how neighbouring pair counts change.
        changed: Counter = Counter()
        for wi in sorted(where.pop(pair)):
            symbols, i = words[wi], 0
            out: list[int] = []
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    if out:  # (prev, a) disappears, (prev, new) appears
                        changed[(out[-1], a)] -= counts[wi]
                        changed[(out[-1], new)] += counts[wi]
                    if i + 2 < len(symbols):  # (b, next) disappears, (new, next) appears
                        changed[(b, symbols[i + 2])] -= counts[wi]
                        changed[(new, symbols[i + 2])] += counts[wi]
                    out.append(new)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                if new in p:
                    where[p].add(wi)
        del pair_counts[pair]
        for p, delta in changed.items():
            if p == pair:
                continue
            pair_counts[p] += delta
            if delta > 0:  # only brand-new pairs (those with the new token) need a fresh heap entry
                heapq.heappush(heap, (-pair_counts[p], p))
    return ByteBPE(vocab, merges)
