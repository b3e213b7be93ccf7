"""The synthetic village: its people, their pets, single-digit arithmetic, and the facts they make.

Facts (an entity + attribute pair, or an arithmetic pair) are split once into train / test / eval
buckets, stratified per attribute, so every bucket sees every question type. See `skillbook.ml.synthetic`
for what is generated from the world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from skillbook.ml.synthetic_vocab import AGES, COLOURS, FOODS, JOBS, OBJECTS, PEOPLE, PETS, SPECIES, STATEMENTS, TOWNS


def article(word: str) -> str:
    """The indefinite article for `word` ("an apple", "a kite")."""
    return "an" if word[0] in "aeiou" else "a"


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
        return template.format(**dict(self.slots), a=article(self.answer))


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


def statement(fact: Fact, rng: random.Random) -> str:
    """`fact` stated in prose, in one of its phrasings (STATEMENTS) drawn from `rng`."""
    return fact.fill(rng.choice(STATEMENTS[fact.attribute]))
