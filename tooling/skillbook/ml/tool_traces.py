"""Tool-use traces and their evaluation: seeded requests over the embedded world (held-out ones apart),
each rendered as one chat conversation request -> call -> result -> answer through the tokenizer's chat
template, tokenized with the loss on the assistant turns only; and the batched executor loop that scores a
model with tools against the same model without.

The tools, the template and the call parser are in skillbook.ml.tool_calls.
"""

from __future__ import annotations

import random
import weakref
from typing import Any

from skillbook.ml.synthetic_vocab import QUESTIONS
from skillbook.ml.synthetic_world import World, make_world
from skillbook.ml.tool_calls import TOOLS, calculate, execute, lookup_args, parse_turn, same_arguments, valid_call


def _request(kind: str, question: str, name: str, arguments: dict, answer: str) -> dict:
    return {"kind": kind, "question": question, "call": {"name": name, "arguments": arguments}, "answer": answer}


ARITHMETIC = ["What is {a} {w} {b}?", "How much is {a} {w} {b}?", "Compute {a} {w} {b}."]


def calculations(max_operand: int) -> int:
    """How many distinct requests a op b exist: a + b for a, b in 0..max_operand, a - b for b <= a."""
    n = max_operand + 1
    return n * n + n * (n + 1) // 2


def make_requests(
    seed: int = 0, n_arithmetic: int = 400, n_held: int = 64, max_operand: int = 20, n_lookup: int | None = None
) -> tuple[list[dict], list[dict], World]:
    """(train, held-out, world): arithmetic requests a + b / a - b (operands 0..max_operand, never a negative
    result; held-out calculations never in train) and lookups of the world's facts (held out: its eval
    facts; `n_lookup` of the training ones, all when None), shuffled."""
    if n_arithmetic + n_held > calculations(max_operand):
        raise ValueError(
            f"{n_arithmetic} + {n_held} arithmetic requests, but only {calculations(max_operand)} distinct "
            f"calculations with operands 0..{max_operand}"
        )
    rng = random.Random(seed * 7919 + 11)
    world = make_world(seed)
    n = n_arithmetic + n_held
    if calculations(max_operand) <= 4 * n:  # a small space: sample from all of it
        pairs = [(a, "+", b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        pairs += [(a, "-", b) for a in range(max_operand + 1) for b in range(a + 1)]
        picked = rng.sample(pairs, n)
    else:  # a large one (operands up to 10**6): draw until n distinct
        seen: set[tuple] = set()
        picked = []
        while len(picked) < n:
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            op = rng.choice("+-")
            pick = (a, op, b) if op == "+" else (max(a, b), op, min(a, b))
            if pick not in seen:
                seen.add(pick)
                picked.append(pick)
    arithmetic = []
    for a, op, b in picked:
        question = rng.choice(ARITHMETIC).format(a=a, w="plus" if op == "+" else "minus", b=b)
        arithmetic.append(
            _request("arithmetic", question, "calculator", {"a": a, "op": op, "b": b}, str(calculate(a, op, b)))
        )
    train, held = arithmetic[n_held:], arithmetic[:n_held]
    lookups = []
    for fact in world.facts:
        if fact.kind != "fact":
            continue
        args = lookup_args(fact)
        if world.split[fact.key] == "eval":
            held.append(
                _request("lookup", fact.fill(rng.choice(QUESTIONS[fact.attribute])), "lookup", args, fact.answer)
            )
        else:
            lookups += [
                _request("lookup", fact.fill(t), "lookup", args, fact.answer) for t in QUESTIONS[fact.attribute]
            ]
    train += lookups if n_lookup is None or n_lookup >= len(lookups) else rng.sample(lookups, n_lookup)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held, world


def tool_call_message(call: dict) -> dict:
    """The assistant message that makes `call`, in the OpenAI format chat templates read."""
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": call}]}


def trace(request: dict, result: str) -> list[dict]:
    """request -> call -> tool result -> final answer, as chat messages."""
    return [
        {"role": "user", "content": request["question"]},
        tool_call_message(request["call"]),
        {"role": "tool", "name": request["call"]["name"], "content": result},
        {"role": "assistant", "content": request["answer"]},
    ]


def render(tok: Any, messages: list[dict], tools: list[dict] | None, prompt: bool) -> str:
    """apply_chat_template as text (+ the generation prompt); bos dropped if the tokenizer adds its own."""
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)
    if tok.bos_token and text.startswith(tok.bos_token) and adds_bos(tok):
        text = text[len(tok.bos_token) :]
    return text


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adds_bos(tok: Any) -> bool:
    """Does encoding a string prepend bos (asked once per tokenizer: rendering thousands of rows)?"""
    if tok not in _ADDS_BOS:
        _ADDS_BOS[tok] = tok("x")["input_ids"][:1] == [tok.bos_token_id]
    return _ADDS_BOS[tok]


def tokenize_trace(tok: Any, messages: list[dict], tools: list[dict] | None) -> dict:
    """{input_ids, completion_mask}: the whole conversation through apply_chat_template, the mask 1 on the
    assistant turns only (each from its generation prompt to its end, eos included), so the user's request
    and the tool's result are context and never a target. TRL's SFTTrainer takes such pre-tokenized rows
    and builds the labels from completion_mask; one row per trace trains both the call and the answer."""
    text = render(tok, messages, tools, prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(tok, messages[:i], tools, prompt=True)
        end = len(text) if i == len(messages) - 1 else len(render(tok, messages[: i + 1], tools, prompt=False))
        if not text.startswith(start):
            raise ValueError("the chat template's generation prompt is not a prefix of the rendered conversation")
        spans.append((len(start), end))
    enc = tok(text, return_offsets_mapping=True)
    mask = [int(a < b and any(s <= a < e for s, e in spans)) for a, b in enc["offset_mapping"]]
    return {"input_ids": enc["input_ids"], "completion_mask": mask}


def sft_rows(tok: Any, requests: list[dict], direct: bool, tools: list[dict] = TOOLS) -> list[dict]:
    """Pre-tokenized TRL rows: per request its trace (call and answer turns in the loss), plus, with
    `direct`, the bare answer to the same request without tools."""
    rows = []
    for r in requests:
        msgs = trace(r, r["answer"])
        rows.append(tokenize_trace(tok, msgs, tools))
        if direct:
            rows.append(tokenize_trace(tok, [msgs[0], msgs[-1]], None))
    return rows


# ---------------------------------------------------------------------------------------------
# The executor loop and the scores
# ---------------------------------------------------------------------------------------------


def answer_with_tools(
    model: Any, tok: Any, requests: list[dict], facts: dict, call_tokens: int = 64, answer_tokens: int = 8
) -> list[dict]:
    """The executor loop, batched: generate (tools in the prompt) -> parse the call -> run it in Python ->
    append call + result -> generate the final answer. A turn without a call is the answer."""
    from skillbook.ml.evaluate import generate_answers

    firsts = [render(tok, [{"role": "user", "content": r["question"]}], TOOLS, prompt=True) for r in requests]
    outs = generate_answers(model, tok, firsts, max_new_tokens=call_tokens)
    records, second, where = [], [], []
    for i, (r, prompt, text) in enumerate(zip(requests, firsts, outs)):
        call, content = parse_turn(tok, text, prompt)
        rec = {"question": r["question"], "expected": r["answer"], "generation": text, "call": call, "result": None}
        rec["answer"] = content if call is None else ""
        if call is not None:
            rec["result"] = execute(call, facts)
            msgs = [{"role": "user", "content": r["question"]}, tool_call_message(call)]
            msgs.append({"role": "tool", "name": call["name"], "content": rec["result"]})
            second.append(render(tok, msgs, TOOLS, prompt=True))
            where.append(i)
        records.append(rec)
    for i, text in zip(where, generate_answers(model, tok, second, max_new_tokens=answer_tokens)):
        records[i]["answer"] = text
    return records


def answer_directly(model: Any, tok: Any, requests: list[dict], answer_tokens: int = 8) -> list[str]:
    """The same requests without tools: one generation, the answer."""
    from skillbook.ml.evaluate import generate_answers

    prompts = [render(tok, [{"role": "user", "content": r["question"]}], None, prompt=True) for r in requests]
    return generate_answers(model, tok, prompts, max_new_tokens=answer_tokens)


def score(requests: list[dict], with_tools: list[dict], direct: list[str]) -> dict[str, dict[str, float]]:
    """Per kind (arithmetic, lookup, all): valid-call, correct-argument and exact-match rates with/without tools."""
    from skillbook.ml.evaluate import answer_matches

    out: dict[str, dict[str, float]] = {}
    for kind in ("arithmetic", "lookup", "all"):
        idx = [i for i, r in enumerate(requests) if kind in ("all", r["kind"])]
        if not idx:
            continue
        n = len(idx)
        out[kind] = {
            "valid_call": sum(valid_call(with_tools[i]["call"]) for i in idx) / n,
            "correct_args": sum(same_arguments(with_tools[i]["call"], requests[i]["call"]) for i in idx) / n,
            "em_tools": sum(answer_matches(with_tools[i]["answer"], requests[i]["answer"]) for i in idx) / n,
            "em_direct": sum(answer_matches(direct[i], requests[i]["answer"]) for i in idx) / n,
            "n": n,
        }
    return out
