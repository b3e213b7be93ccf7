"""The corpus: short prose documents about the synthetic world, with no question/answer format.

Person documents state a few facts about one person (with rare openers and filler), town documents
list residents and jobs, arithmetic documents state sums and differences (some as word problems).
Every fact is stated `repeats` times on average, in random phrasings.
"""

from __future__ import annotations

import random

from skillbook.ml.synthetic_vocab import COUNTABLE, FILLER, OPENERS, PEOPLE, RECALL
from skillbook.ml.synthetic_world import Fact, World, article, statement


def _person_doc(person_facts: list[Fact], name: str, rng: random.Random) -> str:
    chosen = rng.sample(person_facts, rng.randint(3, 5))
    sentences = [statement(f, rng) for f in chosen]
    # Openers and filler make it read like prose but carry no fact: keep them rare, since a 60 s
    # pretraining run has few tokens to spend and every fact needs dozens of exposures.
    if rng.random() < 0.25:
        sentences.insert(rng.randint(1, len(sentences)), rng.choice(FILLER))
    if rng.random() < 0.4:
        sentences.insert(0, rng.choice(OPENERS).format(p=name))
    # Half the stories restate one fact at the end in another phrasing, as real text re-mentions what
    # it said. Without this the model learns "a value never recurs in a document", an anti-copying
    # prior that makes reading an answer off a passage (kind "reading") harder than chance.
    if rng.random() < 0.5:
        again = statement(rng.choice(chosen), rng)
        prefix = rng.choice(RECALL)
        if prefix.startswith(("So", "Again", "In short")) and again.split()[0] in ("The", "By", "Of"):
            again = again[0].lower() + again[1:]
        sentences.append(prefix.format(again))
    return " ".join(sentences)


def _town_doc(town: str, residents: list[dict], rng: random.Random) -> str:
    names = [p["name"] for p in rng.sample(residents, min(len(residents), rng.randint(2, 4)))]
    who = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    jobs = [f"{p['name']} is {article(p['job'])} {p['job']} in {town}." for p in residents if p["name"] in names]
    return f"{town} is a small town. {who} live in {town}. " + " ".join(rng.sample(jobs, min(2, len(jobs))))


def _arith_doc(arith: list[Fact], rng: random.Random) -> str:
    facts = rng.sample(arith, rng.randint(3, 6))
    out = []
    for f in facts:
        s = dict(f.slots)
        if f.attribute == "plus" and rng.random() < 0.2:
            who, food = rng.choice(PEOPLE), rng.choice(COUNTABLE)
            out.append(f"{who} had {s['x']} {food} and got {s['y']} more, so {who} had {s['z']} {food}.")
        else:
            out.append(statement(f, rng))
    return " ".join(out)


def make_corpus(world: World, repeats: int = 40) -> list[str]:
    """Documents (unique, deterministic order) stating every fact about `repeats` times."""
    rng = random.Random(world.seed * 7919 + 1)
    by_person: dict[str, list[Fact]] = {}
    for f in world.facts:
        if f.kind == "fact":
            by_person.setdefault(f.key.split("/")[0], []).append(f)
    arith = [f for f in world.facts if f.kind == "arithmetic"]
    by_town: dict[str, list[dict]] = {}
    for p in world.people:
        by_town.setdefault(p["town"], []).append(p)
    docs: list[str] = []
    # A person doc states ~4 of 9 facts, so ~2.25 docs per repeat cover each fact about `repeats` times.
    for _ in range(repeats):
        for name in sorted(by_person):
            for _ in range(2):
                docs.append(_person_doc(by_person[name], name, rng))
        for _ in range(max(1, len(arith) // 9)):  # ~4.5 statements per doc -> ~repeats/2 per pair
            docs.append(_arith_doc(arith, rng))
        for town in sorted(by_town):
            docs.append(_town_doc(town, by_town[town], rng))
    rng.shuffle(docs)
    seen, unique = set(), []
    for d in docs:  # the generator itself never emits exact duplicates
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique
