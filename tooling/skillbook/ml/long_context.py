"""Long-context helpers: RoPE scaling through transformers' `rope_parameters`, passkey documents built at the
token level, and the two numbers that compare methods (perplexity and passkey accuracy at a length).

- `rope_family` refuses a model whose positions are not rotary (GPT-2's learned absolute positions cannot be
  rescaled: beyond `n_positions` there is no embedding to look up).
- `scaled_config`: one of transformers' RoPE types (`linear` = position interpolation, `dynamic` = dynamic
  NTK, `yarn`, with `beta_fast` suited to the trained context) written into the config; the attention
  layers read it when the model is built, so a scaled model saves and reloads with AutoModelForCausalLM
  like any other.
- `PasskeyMaker`: documents "filler ... The secret name = Mira. Remember it. ... filler What is the secret
  name? The secret name = Mira." of exactly n tokens, the key at a random depth. Built from token ids so the
  training and the evaluation prompts tokenise identically whatever the tokenizer merges.

Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations

import random
from typing import Any

from skillbook.errors import ConfigError

METHODS = ("none", "linear", "dynamic", "yarn")
NOT_ROTARY = {"gpt2": "learned absolute position embeddings (wpe, n_positions)"}  # model_type -> what it has


def rope_family(config: Any) -> None:
    """Refuse a model without rotary position embeddings, or one whose config accepts no other RoPE type,
    naming what is missing."""
    if config.model_type == "phi3":
        raise ConfigError(
            "model: phi3's config accepts only rope_type 'longrope' (transformers' Phi3Config rejects linear, "
            "dynamic and yarn on load); extend it with its published long_factor lists (the Phi-3-*-128k "
            "releases), or use a rotary family whose config takes them (llama, mistral, qwen2, qwen3, gemma2)"
        )
    if config.model_type == "gpt2" or getattr(config, "rope_parameters", None) is None:
        what = NOT_ROTARY.get(config.model_type, "no rope_parameters in its config")
        raise ConfigError(
            f"model: {config.model_type} has {what}; RoPE scaling needs rotary positions (llama, mistral, qwen2, "
            "qwen3, gemma2): extend a rotary model, or retrain this one with a longer context"
        )


def context_of(config: Any) -> int:
    """The context the model was trained at: an earlier scaling's original length, else max_position_embeddings."""
    rope = getattr(config, "rope_parameters", None) or {}
    return int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)


YARN_KEEP_WAVELENGTH = 16  # tokens: rotary pairs faster than this resolve neighbours and are never interpolated


def yarn_beta_fast(context: int) -> float:
    """YaRN's beta_fast for a model trained at `context` tokens: the paper's 32 (pairs with more than 32
    turns over the context keep their frequency), lowered for short contexts so that the pairs with a
    wavelength under 16 tokens still count as fast. At 128 tokens 32 turns would mean a wavelength of 4,
    faster than any pair (the fastest is 2 pi), so every pair gets interpolated, the neighbour-resolving
    ones too, and a tiny model's passkey retrieval did not come back with the fine-tune. From 512 tokens
    up it is 32; never below 2, since it must stay above beta_slow (1)."""
    return max(2.0, min(32.0, context / YARN_KEEP_WAVELENGTH))


def scaled_config(config: Any, method: str, factor: float, beta_fast: float | None = None) -> Any:
    """A copy of `config` with RoPE scaled by `factor` (method "none" leaves positions as trained).

    linear and yarn declare the longer context as max_position_embeddings; dynamic NTK keeps the trained
    length there, because transformers rescales the base only once a sequence grows past it. For yarn,
    `beta_fast` None = `yarn_beta_fast` of the trained context."""
    import copy

    rope_family(config)
    out = copy.deepcopy(config)
    base = context_of(config)
    rope = dict(out.rope_parameters)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if method == "none":
        return out
    params: dict[str, Any] = {"rope_type": method, "rope_theta": theta, "factor": float(factor)}
    if method == "yarn":
        params["original_max_position_embeddings"] = base
        params["beta_fast"] = float(beta_fast or yarn_beta_fast(base))
    if rope.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = rope["partial_rotary_factor"]
    out.rope_parameters = params
    out.max_position_embeddings = base if method == "dynamic" else int(base * factor)
    return out


class PasskeyMaker:
    """Passkey documents of exactly `n` tokens over filler drawn from a token stream (the corpus). The key is
    a name from the embedded world (one token in its tokenizers; 40 names, so chance is 2.5 %) after a cue
    the corpus never uses ("="), asked for at the end: the filler around it is corpus text full of other
    names, so the answer must be read from the statement, however far back it is."""

    def __init__(self, tok: Any, filler: Any, seed: int):
        from skillbook.ml.synthetic_vocab import PEOPLE

        self.tok, self.filler, self.rng, self.keys = tok, filler, random.Random(seed), PEOPLE
        self.question = self.enc(" What is the secret name? The secret name =")

    def enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def make(self, n: int) -> tuple[list[int], list[int], str]:
        """(prompt ids, answer ids, key): prompt + answer is n tokens; the key sits at a random depth."""
        key = self.rng.choice(self.keys)
        statement = self.enc(f" The secret name = {key}. Remember it.")
        answer = self.enc(f" {key}.")
        room = n - len(statement) - len(self.question) - len(answer)
        if room < 8:
            raise ConfigError(f"lengths: {n} tokens leave no room for filler around the passkey; use >= 64 tokens")
        start = self.rng.randrange(0, len(self.filler) - room - 1)
        fill = self.filler[start : start + room].tolist()
        depth = self.rng.randrange(0, room + 1)
        prompt = fill[:depth] + statement + fill[depth:] + self.question
        return prompt, answer, key

    def batch(self, rows: int, n: int):
        """(x, y) of `rows` passkey documents of n tokens: y is x shifted by one, and -100 (ignored by
        cross_entropy) everywhere but the answer, so the loss on these rows is retrieval alone."""
        import torch

        docs, starts = [], []
        for _ in range(rows):
            prompt, answer, _ = self.make(n + 1)
            docs.append(prompt + answer)
            starts.append(len(prompt) - 1)  # y[i] predicts doc[i + 1]: the answer starts at y[len(prompt) - 1]
        t = torch.tensor(docs)
        x, y = t[:, :-1], torch.full((rows, n), -100, dtype=t.dtype)
        for i, start in enumerate(starts):
            y[i, start:] = t[i, start + 1 :]
        return x, y


def perplexity_at(model: Any, tokens: Any, length: int, windows: int, device: str, batch: int = 4) -> float:
    """exp(mean next-token NLL) over the first `windows` held-out windows of `length` tokens."""
    import math

    import torch

    from skillbook.ml import lm_data

    x, y = lm_data.eval_windows(tokens, length, windows)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(input_ids=x[i : i + batch].to(device)).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y[i : i + batch].to(device).flatten(), reduction="sum"
            ).item()
    return math.exp(total / y.numel())


def passkey_accuracy(model: Any, maker: PasskeyMaker, length: int, trials: int, device: str) -> float:
    """Share of `trials` passkey prompts of `length` tokens whose greedy continuation's first word is the key."""
    import torch

    hits, pad = 0, maker.tok.pad_token_id if maker.tok.pad_token_id is not None else maker.tok.eos_token_id
    with torch.no_grad():
        for _ in range(trials):
            prompt, answer, key = maker.make(length)
            ids = torch.tensor([prompt], device=device)
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(answer), do_sample=False, pad_token_id=pad
            )
            text = maker.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            words = text.replace(".", " ").split()
            hits += bool(words) and words[0] == key
    return hits / trials
