"""Speculative decoding, measured: greedy generation with and without a draft, with acceptance counts.

transformers' assisted generation (`generate(assistant_model=draft)`, `prompt_lookup_num_tokens=k`) returns
only the tokens, so the counts come from the target itself: a forward pre-hook records the length of every
verification pass. The first pass holds prompt + proposals, each later one the last accepted token +
proposals, and every pass adds accepted + 1 tokens, so

    proposed = (first pass - prompt) + sum(later passes - 1),   accepted = new tokens - passes.

llama.cpp's prompt-lookup decoding (llama-cpp-python's `LlamaPromptLookupDecoding` as `draft_model=`) is
counted by a draft wrapper that records each proposal; accepted = its common prefix with the output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Decode:
    """One greedy generation: the new token ids, its wall time and its verification counts."""

    tokens: list[int]
    seconds: float
    passes: int  # target forward passes (one per verification round; plain greedy: one per token)
    proposed: int  # draft (or lookup) tokens the target verified
    accepted: int  # of those, how many the target kept

    @property
    def tokens_per_pass(self) -> float:
        return len(self.tokens) / max(self.passes, 1)


@contextmanager
def count_passes(model) -> Iterator[list[int]]:
    """Record the input length of every forward pass of `model` (a list filled while the block runs)."""
    lengths: list[int] = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(int(ids.shape[1]))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield lengths
    finally:
        handle.remove()


def generate(
    model, prompt: list[int], new_tokens: int, draft=None, lookup: int | None = None, ngram: int = 2
) -> Decode:
    """Greedy `new_tokens` after `prompt` (EOS ignored, so every method does the same work), timed and counted.

    draft: an assistant model on the same tokenizer; lookup: prompt-lookup candidates per step, matching
    n-grams of up to `ngram` tokens (transformers' default 2). Neither =
    the target alone. The KV cache is forced on: pretraining saves use_cache=false, and without it
    generate() recomputes the prefix every step.
    """
    import torch

    ids = torch.tensor([prompt], device=model.device)
    extra: dict[str, Any] = {"assistant_model": draft} if draft is not None else {}
    if lookup is not None:
        extra.update(prompt_lookup_num_tokens=lookup, max_matching_ngram_size=ngram)
    pad = model.generation_config.pad_token_id
    with count_passes(model) as lengths, torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0 if pad is None else pad,
            **extra,
        )
        seconds = time.perf_counter() - t0
    tokens = out[0, len(prompt) :].tolist()
    if draft is None and lookup is None:
        proposed = 0
    else:
        proposed = (lengths[0] - len(prompt)) + sum(n - 1 for n in lengths[1:])
    return Decode(tokens, seconds, len(lengths), proposed, len(tokens) - len(lengths))


def configure_draft(draft, num_tokens: int, confidence: float) -> None:
    """Fix the draft length: `constant` schedule (transformers' heuristic one carries state across calls)."""
    gc = draft.generation_config
    gc.num_assistant_tokens = num_tokens
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = confidence


# ---------------------------------------------------------------------------------------------
# llama.cpp: prompt-lookup decoding on a GGUF through llama-cpp-python
# ---------------------------------------------------------------------------------------------


@dataclass
class _CountingLookup:
    """llama-cpp-python's LlamaPromptLookupDecoding, recording (position, proposal) of every call."""

    max_ngram: int
    num_pred: int
    calls: list[tuple[int, list[int]]] = field(default_factory=list)

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        pred = LlamaPromptLookupDecoding.find_candidate_pred_tokens(input_ids, self.max_ngram, self.num_pred)
        self.calls.append((len(input_ids), pred.tolist()))
        return pred


def load_gguf_lookup(path: Path, n_ctx: int, threads: int, num_pred: int | None, max_ngram: int = 2):
    """A llama_cpp.Llama on `path`, with a counting prompt-lookup draft when num_pred is set."""
    import llama_cpp

    draft = _CountingLookup(max_ngram, num_pred) if num_pred else None
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        draft_model=draft,  # type: ignore[arg-type]  # duck-typed: llama.cpp only calls it
        verbose=False,
        seed=0,
    )


def gguf_generate(llm, prompt: list[int], new_tokens: int) -> Decode:
    """Greedy `new_tokens` with llama.cpp (its draft, if any, proposes); passes = proposal rounds + 1."""
    draft = llm.draft_model
    if draft is not None:
        draft.calls.clear()
    llm.reset()
    tokens: list[int] = []
    t0 = time.perf_counter()
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(int(t))
        if len(tokens) >= new_tokens:
            break
    seconds = time.perf_counter() - t0
    seq = prompt + tokens
    proposed = accepted = 0
    for pos, pred in draft.calls if draft is not None else []:
        pred = pred[: max(len(seq) - pos, 0)]  # the part verified before generation stopped
        proposed += len(pred)
        accepted += next((i for i, (p, s) in enumerate(zip(pred, seq[pos:])) if p != s), len(pred))
    passes = len(tokens) - accepted
    return Decode(tokens, seconds, passes, proposed, accepted)
