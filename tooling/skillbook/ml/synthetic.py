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
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from skillbook.ml.synthetic_vocab import (  # noqa: F401  (re-exported: tests and docs read the tables as synthetic.X)
    AGES,
    ANSWER_SETS,
    COLOURS,
    COUNTABLE,
    FILLER,
    FOODS,
    JOBS,
    OBJECTS,
    OPENERS,
    PEOPLE,
    PETS,
    QUESTIONS,
    RECALL,
    SPECIES,
    STATEMENTS,
    TOWNS,
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One verifiable fact: `question` templates take `slots`; `answer` is one word or number."""

    key: str  # stable id, e.g. "Mira/town" or "plus/3/4" (used to split and to test)
    attribute: str  # town, food, ..., plus, minus
    slots: tuple  # sorted (name, value) pairs filling the templates
    answer: str

    @property
    def kind(self) -> str:
        return "arithmetic" if self.attribute in ("plus", "minus") else "fact"

    def fill(self, template: str) -> str:
        return template.format(**dict(self.slots), a=_article(self.answer))


@dataclass
class World:
    """People, their pets and every fact, plus the train / test / eval assignment of each fact."""

    seed: int
    people: list[dict]
    facts: list[Fact]
    split: dict[str, str] = field(default_factory=dict)  # fact key -> "train" | "test" | "eval"

    def facts_in(self, bucket: str) -> list[Fact]:
        return [f for f in self.facts if self.split[f.key] == bucket]


def make_world(
    seed: int = 0, n_people: int = 32, max_operand: int = 9, test_frac: float = 0.15, eval_frac: float = 0.25
) -> World:
    """Draw a world: `n_people` people (each with a pet), arithmetic on 0..max_operand, fact splits."""
    if not 4 <= n_people <= len(PEOPLE):
        raise ValueError(f"n_people must be between 4 and {len(PEOPLE)}, got {n_people}")
    rng = random.Random(seed)
    names = rng.sample(PEOPLE, n_people)
    pets = rng.sample(PETS, n_people)
    people, facts = [], []
    for name, pet in zip(names, pets):
        person = {
            "name": name,
            "town": rng.choice(TOWNS),
            "food": rng.choice(FOODS),
            "job": rng.choice(JOBS),
            "age": rng.choice(AGES),
            "object": rng.choice(OBJECTS),
            "object_colour": rng.choice(COLOURS),
            "pet": pet,
            "pet_species": rng.choice(SPECIES),
            "pet_colour": rng.choice(COLOURS),
        }
        people.append(person)
        slots = (
            ("c", person["pet_colour"]),
            ("o", person["object"]),
            ("p", name),
            ("q", pet),
            ("s", person["pet_species"]),
        )
        for attr, value in (
            ("town", person["town"]),
            ("food", person["food"]),
            ("job", person["job"]),
            ("age", person["age"]),
            ("object_colour", person["object_colour"]),
            ("pet_name", pet),
            ("pet_species", person["pet_species"]),
            ("pet_colour", person["pet_colour"]),
            ("owner", name),
        ):
            facts.append(Fact(f"{name}/{attr}", attr, slots + (("v", str(value)),), str(value)))
    for x in range(max_operand + 1):
        for y in range(max_operand + 1):
            facts.append(
                Fact(f"plus/{x}/{y}", "plus", (("v", str(x + y)), ("x", x), ("y", y), ("z", x + y)), str(x + y))
            )
            if x >= y:
                facts.append(
                    Fact(f"minus/{x}/{y}", "minus", (("v", str(x - y)), ("x", x), ("y", y), ("z", x - y)), str(x - y))
                )
    world = World(seed, people, facts)
    # Split per attribute so every bucket sees every question type (stratified, seeded).
    for attr in sorted({f.attribute for f in facts}):
        keys = [f.key for f in facts if f.attribute == attr]
        rng.shuffle(keys)
        n_eval, n_test = round(len(keys) * eval_frac), round(len(keys) * test_frac)
        for i, key in enumerate(keys):
            world.split[key] = "eval" if i < n_eval else "test" if i < n_eval + n_test else "train"
    return world


# ---------------------------------------------------------------------------------------------
# Corpus: short prose documents. Every fact is stated `repeats` times on average, in random phrasings.
# ---------------------------------------------------------------------------------------------


def _state(fact: Fact, rng: random.Random) -> str:
    return fact.fill(rng.choice(STATEMENTS[fact.attribute]))


def _person_doc(person_facts: list[Fact], name: str, rng: random.Random) -> str:
    chosen = rng.sample(person_facts, rng.randint(3, 5))
    sentences = [_state(f, rng) for f in chosen]
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
        again = _state(rng.choice(chosen), rng)
        prefix = rng.choice(RECALL)
        if prefix.startswith(("So", "Again", "In short")) and again.split()[0] in ("The", "By", "Of"):
            again = again[0].lower() + again[1:]
        sentences.append(prefix.format(again))
    return " ".join(sentences)


def _town_doc(town: str, residents: list[dict], rng: random.Random) -> str:
    names = [p["name"] for p in rng.sample(residents, min(len(residents), rng.randint(2, 4)))]
    who = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    jobs = [f"{p['name']} is {_article(p['job'])} {p['job']} in {town}." for p in residents if p["name"] in names]
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
            out.append(_state(f, rng))
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


# ---------------------------------------------------------------------------------------------
# Supervised rows
# ---------------------------------------------------------------------------------------------


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
    sentences = [_state(fact, rng), _state(other, rng) if other else rng.choice(FILLER)]
    rng.shuffle(sentences)
    return " ".join(sentences)


def _rejected(
    fact: Fact, other: Fact | None, rng: random.Random, names: dict[str, list[str]], avoid: set[str] = frozenset()
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
    """One JSON object per line, UTF-8, keys in insertion order (byte-stable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


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
