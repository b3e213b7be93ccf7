"""Decoding strategies through transformers' `generate`, and the numbers that compare them.

- `generation_config`: one strategy's `GenerationConfig` (greedy, beam search, or sampling with
  temperature / top-k / top-p / min-p / repetition penalty): transformers' own logits processors do the work.
- `generate_texts`: batched generation with left padding, `num_return_sequences` per prompt.
- `distinct_n`: unique n-grams / all n-grams over a set of tokenized generations (Li et al., 2016).
- `answer_key` and `majority_vote`: self-consistency's vote on the normalized first line of each sample.
- `sequence_logprob`: log p(generated tokens | prompt) of one sequence, recomputed with a forward pass.

Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from skillbook.ml.evaluate import normalize


def generation_config(tokenizer: Any, max_new_tokens: int, **settings: Any) -> Any:
    """A GenerationConfig for one strategy. generate() fills every knob left None from the model's
    generation_config.json (an instruct model's do_sample/temperature/top_p) and then transformers' defaults
    (top_k=50), so the knobs a strategy does not use are switched off explicitly."""
    from transformers import GenerationConfig

    sample = bool(settings.get("do_sample"))
    base: dict[str, Any] = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}
    if sample:
        base.update(temperature=1.0, top_k=0, top_p=1.0)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **{**base, **settings},
    )


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    gen_config: Any,
    batch_size: int = 16,
    seed: int = 0,
) -> list[list[str]]:
    """gen_config.num_return_sequences continuations (new text only) per prompt, batched with left padding."""
    import torch

    n = gen_config.num_return_sequences or 1
    torch.manual_seed(seed)  # every strategy draws from the same seed, whatever ran before it
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # the prompt's last token ends every row
    device = next(model.parameters()).device
    out: list[list[str]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                gen = model.generate(**batch, generation_config=gen_config)
            texts = tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            out += [texts[j : j + n] for j in range(0, len(texts), n)]  # a prompt's samples are adjacent rows
    finally:
        tokenizer.padding_side = side
    return out


def distinct_n(sequences: list[list[str]], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams over tokenized generations (0 when there are none).

    Pass tokens (`tokenizer.tokenize(text)`): one-word answers have no word bigrams, but most have token ones.
    """
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_answers(samples: list[str]) -> int:
    """How many different answers (normalized first lines) a question's samples give."""
    return len({answer_key(s) for s in samples})


def answer_key(generation: str) -> str:
    """What self-consistency votes on: the normalized first non-empty line of a generation."""
    lines = [line for line in generation.strip().splitlines() if line.strip()]
    return normalize(lines[0]) if lines else ""


def majority_vote(samples: list[str]) -> tuple[str, float]:
    """(a sample carrying the most common answer key, share of samples that agree with it).

    Ties go to the key seen first, so the vote is deterministic; empty answers only win when all are empty.
    """
    keys = [answer_key(s) for s in samples]
    counts = Counter(k for k in keys if k) or Counter(keys)
    best = max(counts, key=lambda k: (counts[k], -keys.index(k)))
    return samples[keys.index(best)], counts[best] / len(samples)


def sequence_logprob(model: Any, prompt_ids: list[int], new_ids: list[int], eos_id: int | None = None) -> float:
    """Sum of log p(new_ids[t] | prompt, new_ids[:t]), stopping after the first eos (what follows is padding)."""
    import torch

    if eos_id is not None and eos_id in new_ids:
        new_ids = new_ids[: new_ids.index(eos_id) + 1]
    ids = torch.tensor([prompt_ids + new_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, len(prompt_ids) :]
    return float(logp[len(prompt_ids) - 1 :].gather(-1, targets.unsqueeze(-1)).sum())
