"""Rank skills and pipelines for a request with BM25 (`skills search`, `skills prompt --for`, the docs site).

One document per skill (name, description, SKILL.md headings, the example requests in
`metadata.requests`) and per pipeline in recipes/ (name, description), scored with `bm25s`. Words are
normalised by a light English stemmer kept here, so "memorise", "memorizing" and "memorized" meet, and
"top_p", "top-p" and "top p" too. Why not Snowball (PyStemmer, `bm25s[stem]`): it keeps British and
American spellings apart ("memoris" vs "memor", "quantis" vs "quantiz"), and users write both. Below
`NO_SKILL_BELOW` the best score means "no skill serves this"; the threshold is calibrated on
tests/data/skill_requests.yaml (tests/test_search.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from skillbook.catalog import skills as skills_mod

ROUTER = "skillbook"  # the router skill itself is never an answer to a request
REQUESTS_KEY = "requests"  # metadata key: example requests, separated by " | "
# "No skill" when the best hit explains too little of the request or scores too low. Coverage is the share of
# the request's information (IDF-weighted words, unknown words weigh most) found in the hit: raw BM25 alone
# cannot tell "configure my router's wifi password" (one rare word matched) from a short real request.
MIN_COVERAGE = 0.2
NO_SKILL_BELOW = 1.25
NAME_BONUS = 2.0  # added when the request names the entry (every word of its name), so "decoding" finds decoding
# Words that carry no choice between skills: BM25's IDF already shrinks words every document has, but a
# request like "how do I use my model" should score nothing at all.
STOPWORDS = frozenset(
    """a about after again all also am an and any are as at be been before being but by can could did do does
    doing done for from get got had has have having he her here him his how i if in into is it its just me
    more most my myself no nor not now of off on once only or other our out over own same she should so some
    such than that the their them then there these they this those through to too under until up very was
    we were what when where which while who whom why will with would you your yours instead without
    model models llm llms want wants need needs use using used make makes made way ways thing things
    something please try tell let know between set write run runs ran running""".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:[._:/+-][a-z0-9]+)*")
_PLURALS_IN_US = frozenset({"gpus", "cpus", "tpus", "npus"})
_SUFFIXES = (  # (suffix, replacement), first match wins; the stem left must keep >= 3 characters
    ("isations", "iz"),
    ("izations", "iz"),
    ("isation", "iz"),
    ("ization", "iz"),
    ("ational", "at"),
    ("ations", ""),
    ("ation", ""),
    ("ising", "iz"),
    ("izing", "iz"),
    ("ised", "iz"),
    ("ized", "iz"),
    ("isers", "iz"),
    ("izers", "iz"),
    ("iser", "iz"),
    ("izer", "iz"),
    ("ises", "iz"),
    ("izes", "iz"),
    ("ise", "iz"),
    ("ize", "iz"),
    ("ences", ""),
    ("ence", ""),
    ("ings", ""),
    ("ing", ""),
    ("ies", "y"),
    ("ied", "y"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("sses", "ss"),
    ("ers", ""),
    ("er", ""),
    ("ed", ""),
    ("ly", ""),
    ("es", "e"),
    ("s", ""),
)


def stem(word: str) -> str:
    """Light English stemmer: strip inflection and -ise/-ize/-ation so a request meets a skill's wording."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, repl in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word.endswith(("ss", "us", "is")) and word not in _PLURALS_IN_US:
                break
            if (suffix == "ly" and word.endswith("ply")) or (suffix in ("er", "ers") and word[-len(suffix) - 1] == "f"):
                break  # apply, multiply; prefer, transfer (their -ence/-red forms keep the stem)
            word = word[: -len(suffix)] + repl
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    double = len(word) >= 4 and word[-1] == word[-2] and word[-1] not in "aeiousyz"
    if double and (word[-1] != "l" or len(word) > 5):  # distill -> distil, runn -> run; keep "full", "small"
        word = word[:-1]
    return word


def tokens(text: str) -> list[tuple[str, str]]:
    """(word as written, index token) pairs: compounds like `top_p` give their parts and the joined form."""
    out: list[tuple[str, str]] = []
    for match in _WORD.finditer(text.lower()):
        word = match.group(0)
        parts = [p for p in re.split(r"[._:/+-]", word) if p]
        if len(parts) > 1:
            out.append((word, "".join(parts)))
        for part in parts:
            if part in STOPWORDS or len(part) < 2:  # lone letters and digits (the 8 of '8 GPUs') match noise
                continue
            out.append((word if len(parts) == 1 else part, stem(part)))
    return out


def _terms(text: str) -> list[str]:
    """The index tokens of a text, in order."""
    return [t for _, t in tokens(text)]


@dataclass
class Entry:
    """One searchable thing: a skill or a pipeline, and the text it is found by."""

    name: str
    kind: str  # "skill" or "pipeline"
    description: str
    text: str  # everything indexed, name and example requests included

    def terms(self) -> list[str]:
        """The tokens this entry is indexed by (repeats count as term frequency)."""
        return _terms(self.text)


@dataclass
class Hit:
    """One ranked answer: what it is, its BM25 score and the request's words it matched."""

    rank: int
    name: str
    kind: str
    score: float
    coverage: float = 0.0  # IDF-weighted share of the request's words this entry contains
    matched: list[str] = field(default_factory=list)


@dataclass
class Result:
    """The ranked answers to one request; `no_skill` when even the best is under the threshold."""

    query: str
    hits: list[Hit]
    no_skill: bool
    threshold: float = NO_SKILL_BELOW
    min_coverage: float = MIN_COVERAGE

    def as_dict(self) -> dict:
        """The result as plain JSON-ready data (`skills search --json`)."""
        return {
            "query": self.query,
            "no_skill": self.no_skill,
            "threshold": self.threshold,
            "min_coverage": self.min_coverage,
            "hits": [asdict(h) for h in self.hits],
        }


def requests_of(metadata: dict[str, str]) -> list[str]:
    """A skill's example requests from `metadata.requests` (one string, requests separated by ' | ')."""
    return [r.strip() for r in metadata.get(REQUESTS_KEY, "").split("|") if r.strip()]


def entries(root: Path | None = None) -> list[Entry]:
    """Every skill (but the router) and every pipeline, with the text each is indexed by."""
    root = root or skills_mod.repo_root()
    out = []
    for skill in skills_mod.load_all(root):
        if skill.name == ROUTER or skill.metadata.get("router") == "true" or not skill.description:
            continue
        _, _, headings = skill.scan()
        words = skill.name.replace("-", " ")
        text = "\n".join(
            [words, words, skill.description, *(h.text for h in headings if h.level <= 3), *requests_of(skill.metadata)]
        )
        out.append(Entry(skill.name, "skill", skill.description, text))
    for path in skills_mod.pipeline_files(root):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        desc = str(data.get("description", "")) if isinstance(data, dict) else ""
        words = path.stem.replace("-", " ")
        out.append(Entry(path.stem, "pipeline", desc, f"{words}\n{words}\n{desc}"))
    return out


class Index:
    """A BM25 index over `entries()`; build once, query many times."""

    def __init__(self, items: list[Entry]):
        import bm25s  # numpy + scipy only; imported here so `skills list` never pays for it

        self.items = items
        self.doc_terms = [set(e.terms()) for e in items]
        self.bm25 = bm25s.BM25()
        self.bm25.index([e.terms() or ["-"] for e in items], show_progress=False)  # "-": bm25s needs a token
        self.name_terms = [set(_terms(e.name.replace("-", " "))) or {e.name} for e in items]
        self.df: dict[str, int] = {}
        for terms in self.doc_terms:
            for t in terms:
                self.df[t] = self.df.get(t, 0) + 1

    def idf(self, term: str) -> float:
        """BM25's (Lucene) inverse document frequency; a word no entry has weighs most."""
        n = self.df.get(term, 0)
        return math.log(1 + (len(self.items) - n + 0.5) / (n + 0.5))

    def search(self, query: str, k: int = 5) -> Result:
        """The top `k` entries for `query`, each with its score, coverage and matched words."""
        pairs = tokens(query)
        known = [(w, t) for w, t in pairs if t in self.df]
        weight = {t: self.idf(t) for _, t in pairs}
        total = sum(weight.values()) or 1.0
        hits: list[Hit] = []
        if known:
            scores = self.bm25.get_scores([t for _, t in known])
            asked = {t for _, t in known}
            for i, name in enumerate(self.name_terms):
                if name <= asked:
                    scores[i] += NAME_BONUS
            order = sorted(range(len(self.items)), key=lambda i: (-float(scores[i]), self.items[i].name))
            for i in order[:k]:
                if scores[i] <= 0:
                    break
                have = self.doc_terms[i]
                matched = list(dict.fromkeys(w for w, t in known if t in have))
                cover = sum(v for t, v in weight.items() if t in have) / total
                item = self.items[i]
                hits.append(
                    Hit(len(hits) + 1, item.name, item.kind, round(float(scores[i]), 3), round(cover, 3), matched)
                )
        weak = not hits or hits[0].score < NO_SKILL_BELOW or hits[0].coverage < MIN_COVERAGE
        return Result(query, hits, weak)

    def export(self) -> dict:
        """Everything a client-side ranker needs to give the same scores (the docs site's search box).

        A BM25 score is a sum over the request's tokens of a per-(token, entry) weight, so the weights,
        the IDFs (for coverage), the name terms and the thresholds reproduce `search` once `tokens()` is
        ported: lowercase, split compounds, drop STOPWORDS and 1-letter words, then `forms` maps each word
        the entries contain to its stem (a word no entry contains cannot match, stemmed or not, so the
        stemmer itself is not ported; only its coverage weight can differ, by that word's stem being known).
        """
        weights = {}
        for term in sorted(self.df):
            scores = self.bm25.get_scores([term])
            weights[term] = [[i, round(float(v), 4)] for i, v in enumerate(scores) if v > 0]
        return {
            "entries": [{"name": e.name, "kind": e.kind, "description": e.description} for e in self.items],
            "weights": weights,
            "idf": {t: round(self.idf(t), 4) for t in sorted(self.df)},
            "name_terms": [sorted(n) for n in self.name_terms],
            "no_skill_below": NO_SKILL_BELOW,
            "min_coverage": MIN_COVERAGE,
            "name_bonus": NAME_BONUS,
            "stopwords": sorted(STOPWORDS),
            "forms": self.forms(),
            "unknown_idf": round(self.idf("\0"), 4),
        }

    def forms(self) -> dict[str, str]:
        """Every word part in the indexed texts whose stem differs from it -> that stem."""
        parts = {p for e in self.items for w in _WORD.findall(e.text.lower()) for p in re.split(r"[._:/+-]", w) if p}
        return {p: stem(p) for p in sorted(parts) if stem(p) != p}


def build(root: Path | None = None) -> Index:
    """The index of the repository's skills and pipelines."""
    return Index(entries(root))


def search(query: str, k: int = 5, root: Path | None = None) -> Result:
    """Rank skills and pipelines for one request (builds the index: ~30 documents, milliseconds)."""
    return build(root).search(query, k=k)
