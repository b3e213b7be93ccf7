"""Multi-step problems about the synthetic world, each with its worked steps, for chain-of-thought SFT.

Two kinds, each with 1, 2 and 3 steps:

- arithmetic: "What is 3 plus 4 minus 2?" -> " Step 1: 3 plus 4 is 7. Step 2: 7 minus 2 is 5. So the
  answer is 5." Every step adds or subtracts two single-digit numbers (0-9, results 0-18), the sums the
  pretraining corpus states ("3 plus 4 is 7."), so each step is learnable; intermediate results stay in
  0-9 so the next step is one too. The bare answer of a 2- or 3-step problem needs the composition.
- facts: 1 step "Where does Mira live?"; 2 steps "Where does the owner of Pip live?" (pet -> owner ->
  attribute); 3 steps "Where does the owner of the red cat live?" (a pet's unique colour and species ->
  pet -> owner -> attribute). Each step is a sentence in the corpus's phrasing ("Pip belongs to Mira.").

Problems are split per (kind, steps) stratum into train and test by a seeded shuffle: a test problem
never appears in training (its steps do, inside other problems: that is what makes them learnable).
Rows carry both completions: `cot` (worked steps) and `direct` (the bare answer, " 5"). Pure Python and
deterministic: the same seed gives the same rows.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from skillbook.ml.evaluate import normalize
from skillbook.ml.synthetic_questions import prompt_for
from skillbook.ml.synthetic_world import World, article, make_world

STEPS = (1, 2, 3)
KINDS = ("arithmetic", "facts")
_OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b}

# Attribute -> (question with the subject in {who}, the step sentence in the corpus's phrasing).
# The last step opens with the attribute the question asks for, in a phrasing the corpus has (STATEMENTS):
# a step that opens with the person's name lets a small model continue with any sentence it memorised about
# them ("Ivo is a builder" for a food question); "The favourite food of Ivo is" leaves one continuation.
_FACT_QUESTIONS = {
    "town": ("Where does {who} live?", "The home of {p} is in {v}."),
    "job": ("What is the job of {who}?", "The job of {p} is {v}."),
    "food": ("What food does {who} like best?", "The favourite food of {p} is {v}."),
}


@dataclass(frozen=True)
class Problem:
    """One problem: its question, worked steps, final answer, kind and number of steps."""

    key: str  # stable id, e.g. "arithmetic/3+4-2" or "facts/Pip/town"
    kind: str
    steps: int
    question: str
    worked: tuple[str, ...]  # one sentence per step, without the "Step i:" prefix
    answer: str

    def row(self) -> dict:
        """{prompt, cot, direct, answer, kind, steps}: the prompt format every stage uses, both completions."""
        chain = " ".join(f"Step {i}: {s}" for i, s in enumerate(self.worked, 1))
        return {
            "prompt": prompt_for(self.question),
            "cot": f" {chain} So the answer is {self.answer}.",
            "direct": f" {self.answer}",
            "answer": self.answer,
            "kind": self.kind,
            "steps": self.steps,
        }


# ---------------------------------------------------------------------------------------------
# Arithmetic chains
# ---------------------------------------------------------------------------------------------


def arithmetic_problems(steps: int, max_operand: int = 9) -> list[Problem]:
    """Every left-to-right chain of `steps` single-digit plus/minus steps whose intermediates stay in
    0..max_operand and whose results are never negative (the final one may reach 2 x max_operand)."""
    digits = range(max_operand + 1)
    out = []
    for first in digits:
        for ops in itertools.product(_OPS, repeat=steps):
            for operands in itertools.product(digits, repeat=steps):
                value, worked, ok = first, [], True
                for i, (op, y) in enumerate(zip(ops, operands)):
                    new = _OPS[op](value, y)
                    if new < 0 or (i < steps - 1 and new > max_operand):
                        ok = False
                        break
                    worked.append(f"{value} {op} {y} is {new}.")
                    value = new
                if ok:
                    expr = " ".join([str(first), *(f"{op} {y}" for op, y in zip(ops, operands))])
                    key = "arithmetic/" + expr.replace(" plus ", "+").replace(" minus ", "-")
                    out.append(Problem(key, "arithmetic", steps, f"What is {expr}?", tuple(worked), str(value)))
    return out


# ---------------------------------------------------------------------------------------------
# Chains over the world's facts
# ---------------------------------------------------------------------------------------------


def fact_problems(world: World, steps: int) -> list[Problem]:
    """Questions about a person's town/job/food reached through 0, 1 or 2 hops: the person, their pet's
    owner, or the owner of the only pet of a colour and species ("the red cat")."""
    combos = Counter((p["pet_colour"], p["pet_species"]) for p in world.people)
    out = []
    for person in world.people:
        name, pet = person["name"], person["pet"]
        colour, species = person["pet_colour"], person["pet_species"]
        if steps == 1:
            who, hops = name, []
        elif steps == 2:
            who, hops = f"the owner of {pet}", [f"{pet} belongs to {name}."]
        elif combos[(colour, species)] == 1:  # a description that names exactly one pet
            who = f"the owner of the {colour} {species}"
            hops = [f"The {colour} {species} is {pet}.", f"{pet} belongs to {name}."]
        else:
            continue
        for attr, (question, sentence) in _FACT_QUESTIONS.items():
            value = person[attr]
            last = sentence.format(p=name, v=value, a=article(value))
            q = question.format(who=who)
            out.append(
                Problem(f"facts/{steps}/{name}/{attr}", "facts", steps, q[0].upper() + q[1:], (*hops, last), value)
            )
    return out


# ---------------------------------------------------------------------------------------------
# The dataset: train/test split per stratum
# ---------------------------------------------------------------------------------------------


def generate(
    seed: int = 0, test_fraction: float = 0.2, max_per_stratum: int = 400, n_people: int = 32
) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows}: per (kind, steps), at most `max_per_stratum` problems drawn by a seeded
    shuffle, `test_fraction` of them held out. The world is the default data's (same seed, same people),
    so the fact chains are about what the pretraining corpus states."""
    world = make_world(seed, n_people=n_people)
    rng = random.Random(seed * 6151 + 5)
    split: dict[str, list[dict]] = {"train": [], "test": []}
    for kind in KINDS:
        for steps in STEPS:
            problems = arithmetic_problems(steps) if kind == "arithmetic" else fact_problems(world, steps)
            rng.shuffle(problems)
            problems = problems[:max_per_stratum]
            n_test = max(1, round(len(problems) * test_fraction))
            split["test"] += [p.row() for p in problems[:n_test]]
            split["train"] += [p.row() for p in problems[n_test:]]
    for rows in split.values():
        rng.shuffle(rows)  # any prefix mixes kinds and step counts
    return split


def from_user_rows(rows: list[dict]) -> list[dict]:
    """The user's {prompt, cot, answer} rows (optional steps, kind) in this module's row format: `direct` is
    " <answer>"; `steps` = the given count, else the "Step i:" markers in cot, else its non-empty lines
    before the answer line."""
    out = []
    for r in rows:
        cot = r["cot"].strip()
        steps = (
            r.get("steps")
            or len(re.findall(r"Step \d+:", cot))
            or len([x for x in cot.splitlines() if x.strip() and "answer is" not in x])
        )
        out.append(
            {
                "prompt": r["prompt"],
                "cot": f" {cot}",
                "direct": f" {r['answer'].strip()}",
                "answer": r["answer"].strip(),
                "kind": str(r.get("kind", "data")),
                "steps": max(1, int(steps)),
            }
        )
    return out


def bucket(steps: int) -> int:
    """The table's column of a problem: 1, 2, or 3 (3 or more steps)."""
    return min(int(steps), 3)


def balanced(rows: list[dict], per_stratum: int) -> list[dict]:
    """The first `per_stratum` rows of each (kind, steps bucket) stratum, in order (a balanced held-out set)."""
    seen: Counter = Counter()
    out = []
    for r in rows:
        if seen[(r["kind"], bucket(r["steps"]))] < per_stratum:
            seen[(r["kind"], bucket(r["steps"]))] += 1
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# Reading an answer off a generation
# ---------------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"answer is\s+(\S+?)[.,!?]*(?:\s|$)", re.IGNORECASE)


def extract_answer(generation: str) -> str:
    """The final answer of a generation, normalised: the word after the first "answer is" (what follows it is
    rambling past the answer), else the last word of the first line (a direct answer " 5" is its own)."""
    found = _ANSWER_IS.search(generation)
    if found:
        return normalize(found.group(1))
    lines = [line for line in generation.strip().splitlines() if line.strip()]
    words = normalize(lines[0]).split() if lines else []
    return words[-1] if words else ""


def steps_correct(generation: str, row: dict) -> bool:
    """Does a CoT generation contain every worked step of `row` (its reasoning, not only its answer)?"""
    want = re.findall(r"Step \d+: ([^.]*\.)", row["cot"])
    return all(s in generation for s in want)


# ---------------------------------------------------------------------------------------------
# Scoring a saved model: exact match by number of steps
# ---------------------------------------------------------------------------------------------


def score(model_dir: str | Path, rows: list[dict], mode: str, gen: dict) -> dict:
    """Exact match of the hf-model in `model_dir` (reloaded with AutoModelForCausalLM) on `rows`.

    `gen`: max_new_tokens, batch_size, seed, and for self-consistency num_samples > 1 with a temperature
    (the answers extracted from the sampled chains are majority-voted; greedy otherwise). Returns
    {all, multi, by_steps, by_kind, steps_correct (CoT: every reference step written), correct, samples}.
    """
    import torch

    from skillbook.ml.decoding import generate_texts, generation_config, majority_vote
    from skillbook.ml.evaluate import load_model_and_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model_and_tokenizer(str(model_dir), device=device)
    n = int(gen.get("num_samples", 1))
    settings: dict = {"do_sample": True, "temperature": gen["temperature"], "num_return_sequences": n} if n > 1 else {}
    config = generation_config(tok, gen["max_new_tokens"], **settings)
    texts = generate_texts(model, tok, [r["prompt"] for r in rows], config, gen["batch_size"], gen["seed"])
    answers = [majority_vote([extract_answer(t) for t in samples])[0] for samples in texts]
    correct = [a == normalize(r["answer"]) for a, r in zip(answers, rows)]
    firsts = [samples[0] for samples in texts]

    def mean(flags: list[bool]) -> float:
        return sum(flags) / len(flags) if flags else 0.0

    def by_steps(keep) -> dict[int, float]:
        return {s: mean([c for c, r in zip(correct, rows) if bucket(r["steps"]) == s and keep(r)]) for s in STEPS}

    kinds = sorted({r["kind"] for r in rows})
    return {
        "all": mean(correct),
        "multi": mean([c for c, r in zip(correct, rows) if r["steps"] > 1]),
        "by_steps": by_steps(lambda r: True),
        "by_kind": {k: by_steps(lambda r, k=k: r["kind"] == k) for k in kinds},
        "steps_correct": mean([steps_correct(t, r) for t, r in zip(firsts, rows)]) if mode == "cot" else 0.0,
        "correct": correct,
        "samples": [
            {"prompt": r["prompt"], "generation": t, "answer": r["answer"]}
            for r, t in list(zip(rows, firsts))[:: max(1, len(rows) // 4)][:4]
        ],
    }
