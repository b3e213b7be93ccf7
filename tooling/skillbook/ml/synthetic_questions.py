"""Supervised rows about the synthetic world: questions with their answer and a plausible wrong one.

Each row becomes an SFT row ("Question: ...\\nAnswer:" -> " <word>") and a preference pair (the
correct answer chosen over a wrong one of the kinds a small model gets wrong: another value of the same
type, the name asked about, or a value of the wrong type).
"""

from __future__ import annotations

import random
from collections.abc import Set

from skillbook.ml.synthetic_vocab import AGES, ANSWER_SETS, FILLER, QUESTIONS
from skillbook.ml.synthetic_world import Fact, World, statement


def prompt_for(question: str) -> str:
    """The one prompt format every Skillbook stage uses."""
    return f"Question: {question}\nAnswer:"


def _wrong(fact: Fact, rng: random.Random, names: dict[str, list[str]]) -> str:
    """A plausible wrong answer of the same type: another colour, town, a nearby number ..."""
    pool = names.get(fact.attribute) or ANSWER_SETS.get(fact.attribute)
    if pool:  # names come from this world, so a wrong owner is a person the corpus knows
        return rng.choice([v for v in pool if v != fact.answer])
    n = int(fact.answer)
    lo = 0 if fact.kind == "arithmetic" else min(AGES)
    options = [v for v in range(max(lo, n - 3), n + 4) if v != n]
    return str(rng.choice(options))


def _answer_type(attribute: str) -> str:
    """Attributes whose answers could be confused share a type (two colours, two numbers)."""
    return {
        "object_colour": "colour",
        "pet_colour": "colour",
        "plus": "number",
        "minus": "number",
        "age": "number",
    }.get(attribute, attribute)


def _other_fact(world: World, fact: Fact, rng: random.Random) -> Fact | None:
    """Another fact about the same person whose answer has a different type (None for arithmetic)."""
    if fact.kind == "arithmetic":
        return None
    person = fact.key.split("/")[0]
    pool = [
        f
        for f in world.facts
        if f.key.split("/")[0] == person and _answer_type(f.attribute) != _answer_type(fact.attribute)
    ]
    return rng.choice(pool)


def _passage(fact: Fact, other: Fact | None, rng: random.Random) -> str:
    """Two sentences in random order: `fact`, and `other` (or, for arithmetic, a filler line), so
    exactly one value of the asked type is present."""
    sentences = [statement(fact, rng), statement(other, rng) if other else rng.choice(FILLER)]
    rng.shuffle(sentences)
    return " ".join(sentences)


def _rejected(
    fact: Fact, other: Fact | None, rng: random.Random, names: dict[str, list[str]], avoid: Set[str] = frozenset()
) -> str:
    """A wrong answer of one of three kinds, the mistakes a small model fine-tuned on these
    questions actually makes (seen in its greedy answers), so preference tuning has something to fix:

    - value:     a same-type wrong value (another town, a nearby number), never a word in `avoid`;
    - echo:      the name the question is about ("What colour is Hazel?" -> "Hazel"), or an operand;
    - attribute: a true value of another attribute, the wrong type ("Hazel" -> "cat"), or for
                 arithmetic the other operation's result (5 plus 3 -> "2"; 3 plus 9 -> "6", never negative).
    """
    slots = dict(fact.slots)
    mode = rng.choice(("value", "echo", "attribute"))
    if mode == "echo":
        options = (
            [str(slots["x"]), str(slots["y"])]
            if fact.kind == "arithmetic"
            else [slots["q"] if fact.attribute in ("pet_species", "pet_colour", "owner") else slots["p"]]
        )
    elif mode == "attribute":
        options = (
            [other.answer]
            if other
            else [str(abs(slots["x"] - slots["y"])) if fact.attribute == "plus" else str(slots["x"] + slots["y"])]
        )
    else:
        options = []
    options = [o for o in options if o != fact.answer]
    if options:
        return rng.choice(options)
    wrong = _wrong(fact, rng, names)
    while wrong in avoid:  # a value-mode answer must not be readable in the passage
        wrong = _wrong(fact, rng, names)
    return wrong


def question_rows(
    world: World, facts: list[Fact], rng: random.Random, all_templates: bool, reading: bool
) -> list[dict]:
    """One row per (fact, template): prompt, answer, a wrong answer (see `_rejected`) and kind.

    Closed-book rows ask the bare question (the fact must come from pretraining). With `reading`,
    each also gets a twin whose prompt starts with a two-sentence passage that states the fact next to
    another fact about the same entity with a different answer type ("Mira lives in Brook. Mira is
    34."): kind "reading". A same-type wrong answer is never one the passage states, so a model that
    reads the passage and picks the value of the asked type wins; pure recall is not needed.
    """
    names = {"owner": [p["name"] for p in world.people], "pet_name": [p["pet"] for p in world.people]}
    rows = []
    for f in facts:
        templates = QUESTIONS[f.attribute] if all_templates else [rng.choice(QUESTIONS[f.attribute])]
        for t in templates:
            question = f.fill(t)
            other = _other_fact(world, f, rng)
            rows.append(
                {
                    "prompt": prompt_for(question),
                    "answer": f.answer,
                    "wrong": _rejected(f, other, rng, names),
                    "kind": f.kind,
                    "fact": f.key,
                }
            )
            if reading:
                passage = _passage(f, other, rng)
                words = set(passage.replace(".", " ").split())
                rows.append(
                    {
                        "prompt": f"{passage}\n{prompt_for(question)}",
                        "answer": f.answer,
                        "wrong": _rejected(f, other, rng, names, avoid=words),
                        "kind": "reading",
                        "fact": f.key,
                    }
                )
    return rows


def as_sft(rows: list[dict], kind: bool = False) -> list[dict]:
    """{"prompt","completion"} rows (+ "kind" for the eval set); completions start with a space."""
    return [
        {"prompt": r["prompt"], "completion": f" {r['answer']}", **({"kind": r["kind"]} if kind else {})} for r in rows
    ]


def as_preference(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": f" {r['answer']}", "rejected": f" {r['wrong']}"} for r in rows]
