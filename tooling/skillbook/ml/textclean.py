"""Text cleaning for pretraining corpora: normalise, filter short documents, drop exact and near duplicates.

The order matters and follows real pipelines (FineWeb, Dolma): normalise first so that trivially
different copies (NFD vs NFC accents, extra spaces) hash the same; drop exact duplicates with a
cheap hash; only then run MinHash + LSH on what is left to catch near duplicates. Documents are
processed in input order and the first copy wins, so the result is deterministic.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

_SPACES = re.compile(r"[^\S\n]+")  # any whitespace except newline
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")  # 3+ newlines (with stray spaces) -> one blank line
_CONTROL = {c: None for c in range(32) if c not in (9, 10)} | {0x7F: None}
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """Unicode NFC, no control characters, single spaces, at most one blank line, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def shingles(text: str, n: int = 5) -> set[str]:
    """Word n-grams of the lower-cased text (the whole text if it has fewer than n words)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (what MinHash estimates)."""
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


@dataclass
class CleanStats:
    """What cleaning did, for stats.json and the report."""

    input_documents: int = 0
    too_short: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    output_documents: int = 0
    examples: list[dict] = field(default_factory=list)  # a few (removed, kept) near-duplicate pairs

    def as_dict(self) -> dict:
        return {
            "input_documents": self.input_documents,
            "too_short": self.too_short,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "output_documents": self.output_documents,
        }


def clean(
    docs: list[str],
    *,
    dedup: bool = True,
    near_dedup: bool = True,
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
    min_chars: int = 1,
    seed: int = 1,
    max_examples: int = 3,
) -> tuple[list[str], CleanStats]:
    """Normalise `docs`, drop ones shorter than `min_chars`, then exact and MinHash near duplicates."""
    stats = CleanStats(input_documents=len(docs))
    kept: list[str] = []
    seen: set[bytes] = set()
    for doc in docs:
        doc = normalize(doc)
        if len(doc) < min_chars:
            stats.too_short += 1
            continue
        if dedup:
            digest = hashlib.sha1(doc.encode("utf-8")).digest()
            if digest in seen:
                stats.exact_duplicates += 1
                continue
            seen.add(digest)
        kept.append(doc)
    if dedup and near_dedup and kept:
        kept = _near_dedup(kept, stats, threshold, num_perm, ngram, seed, max_examples)
    stats.output_documents = len(kept)
    return kept, stats


def _near_dedup(
    docs: list[str], stats: CleanStats, threshold: float, num_perm: int, ngram: int, seed: int, max_examples: int
) -> list[str]:
    """MinHash signatures + LSH banding: query each document against those kept before it."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    # bulk() draws the random permutations once and reuses them for every document (much faster).
    signatures = MinHash.bulk(
        ([s.encode("utf-8") for s in sorted(shingles(d, ngram))] for d in docs), num_perm=num_perm, seed=seed
    )
    kept: list[str] = []
    sigs: list = []  # signature of each kept document, by its index in `kept`
    for doc, mh in zip(docs, signatures):
        # LSH returns candidates; confirm with the signature estimate so banding noise cannot drop a document.
        hits = sorted(i for i in lsh.query(mh) if sigs[i].jaccard(mh) >= threshold)
        if hits:
            stats.near_duplicates += 1
            if len(stats.examples) < max_examples:
                stats.examples.append(
                    {"removed": doc, "kept": kept[hits[0]], "jaccard": round(jaccard(doc, kept[hits[0]], ngram), 3)}
                )
            continue
        sigs.append(mh)
        lsh.insert(len(kept), mh)
        kept.append(doc)
    return kept
