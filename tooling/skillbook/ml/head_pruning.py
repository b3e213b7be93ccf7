"""Structured attention-head pruning: remove whole KV groups (one key/value head and the query heads that
share it) from every layer, and build a really smaller model from the edited config.

- `HEAD_LAYOUTS`: per family, where each head's rows/columns live. Llama-style (llama, mistral, qwen2, qwen3,
  gemma2): rows of q_proj/k_proj/v_proj (and their biases, qwen2) and columns of o_proj; qwen3/gemma2's
  q_norm/k_norm act per head_dim, shared by all heads, and stay as they are. phi3: one fused qkv_proj whose
  rows are [q heads | k heads | v heads], and o_proj.
- GQA-consistent: query head h reads KV head h // (num_attention_heads / num_key_value_heads) (transformers'
  repeat_kv), so a KV group is a contiguous chunk of every q/k/v/o block. Dropping whole groups keeps the
  ratio, and the same count is dropped in every layer because the config has one num_attention_heads.
- The new config sets num_attention_heads, num_key_value_heads and an explicit head_dim: without it the
  modeling code of every family here computes hidden_size // num_attention_heads, which would change.
- gpt2 is refused: transformers 5.x removed `prune_heads` and `config.pruned_heads`, and GPT2Attention
  derives head_dim = n_embd / n_head with c_attn fixed at 3 x n_embd, so no config describes fewer heads.

Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations

import copy
from typing import Any

from skillbook.errors import ConfigError
from skillbook.ml.pruning import rebuild

# Layout: parameter suffix -> (the dim that holds heads, the blocks stacked along it: "q" = num_attention_heads
# x head_dim, "k"/"v" = num_key_value_heads x head_dim). Group g is chunk g of every block.
_Layout = dict[str, tuple[int, tuple[str, ...]]]
_SPLIT: _Layout = {
    **{f"self_attn.{p}_proj.{w}": (0, (p,)) for p in "qkv" for w in ("weight", "bias")},
    "self_attn.o_proj.weight": (1, ("q",)),
}
_FUSED: _Layout = {"self_attn.qkv_proj.weight": (0, ("q", "k", "v")), "self_attn.o_proj.weight": (1, ("q",))}
HEAD_LAYOUTS: dict[str, _Layout] = {
    **{t: _SPLIT for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2")},
    "phi3": _FUSED,
}
REFUSED = {
    "gpt2": "transformers 5.x removed PreTrainedModel.prune_heads and config.pruned_heads, and GPT2Attention "
    "derives head_dim = n_embd / n_head with c_attn fixed at 3 x n_embd, so no gpt2 config describes fewer heads",
}


def head_layout(config: Any) -> _Layout:
    """The attention layout of a config's family, or one ConfigError naming what is missing."""
    kind = config.model_type
    if kind in REFUSED:
        raise ConfigError(
            f"head_sparsities: {kind} cannot be head-pruned: {REFUSED[kind]}; set head_sparsities: [] "
            "(unstructured and MLP pruning work on it)"
        )
    if kind not in HEAD_LAYOUTS:
        raise ConfigError(
            f"head_sparsities: model_type {kind!r} has no known attention-head layout (known: "
            f"{', '.join(sorted(HEAD_LAYOUTS))}; refused: {', '.join(sorted(REFUSED))}); set head_sparsities: [] "
            "or add its q/k/v/o tensors to HEAD_LAYOUTS in skillbook.ml.head_pruning"
        )
    return HEAD_LAYOUTS[kind]


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) as the family's modeling code computes them."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv, head_dim


def pruned_config(config: Any, share: float) -> tuple[Any, int]:
    """The config with `share` of the KV groups removed, validated by its class, and the kept group count.
    A share that is not a whole number of groups, leaves no group, or gives a head count the family's config
    rejects (llama, gemma2: hidden_size % num_attention_heads) is one ConfigError listing the shares that work."""
    head_layout(config)
    heads, kv, head_dim = attention_shape(config)
    ok = [k / kv for k in range(kv) if _valid(config, kv - k, heads // kv, head_dim) is None]
    fix = f"use one of {[round(s, 4) for s in ok]} ({kv} KV groups of {heads // kv} query heads)"
    drop = share * kv
    if abs(drop - round(drop)) > 1e-6:
        raise ConfigError(f"head_sparsities: {share} x {kv} KV groups is not a whole number of groups; {fix}")
    keep = kv - round(drop)
    if keep < 1:
        raise ConfigError(f"head_sparsities: {share} removes all {kv} KV groups, at least 1 must stay; {fix}")
    problem = _valid(config, keep, heads // kv, head_dim)
    if problem:
        raise ConfigError(
            f"head_sparsities: {share} leaves {keep * heads // kv} heads, which {type(config).__name__} rejects "
            f"({problem.rstrip('.')}); {fix}"
        )
    new = copy.deepcopy(config)
    new.num_attention_heads, new.num_key_value_heads, new.head_dim = keep * heads // kv, keep, head_dim
    return new, keep


def _valid(config: Any, keep: int, rep: int, head_dim: int) -> str | None:
    """None if the family's config class accepts `keep` KV groups (its @strict validators), else why not."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    new = copy.deepcopy(config)
    new.num_attention_heads, new.num_key_value_heads, new.head_dim = keep * rep, keep, head_dim
    try:
        new.validate()
    except (StrictDataclassClassValidationError, ValueError) as err:  # the first wraps the validator's ValueError
        return str(err).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
    return None


def check(config: Any, shares: list[float]) -> None:
    """Every share in `shares` is possible on this config (before any weights load)."""
    for share in shares:
        pruned_config(config, share)


def group_importance(model: Any) -> Any:
    """[layers, kv groups] importance: the product of the L2 norms of the group's slices of every weight
    (its query heads' q rows and o_proj columns, its k rows and v rows; phi3: the same rows of qkv_proj).

    Why a product: the group adds o_G . (softmax(q_G k_g^T) v_g) to the residual stream, linear in v_g and
    o_G, so a near-zero slice there silences the group whatever the rest; q_G and k_g scale the logits (small
    ones give a flat, position-blind average). It is the rule shrink_mlp uses for MLP channels.
    """
    import torch

    layers, rules = _layers(model)
    heads, kv, head_dim = attention_shape(model.config)
    state = model.state_dict()
    score = torch.ones(len(layers), kv, dtype=torch.float64)
    for i, keys in enumerate(layers.values()):
        for suffix, key in keys.items():
            if suffix.endswith(".weight"):
                dim, parts = rules[suffix]
                for block in _blocks(state[key].detach(), dim, parts, heads, kv, head_dim):
                    score[i] *= block.double().reshape(kv, -1).norm(dim=1)
    return score


def prune_heads(model: Any, share: float) -> Any:
    """A new model with round(share x num_key_value_heads) KV groups removed from every layer: in each
    layer the least important groups (group_importance) go; the kept rows/columns are copied in order."""
    import torch

    config, keep = pruned_config(model.config, share)
    layers, rules = _layers(model)
    heads, kv, head_dim = attention_shape(model.config)
    score = group_importance(model)
    state = model.state_dict()
    new_state = dict(state)
    for i, keys in enumerate(layers.values()):
        kept = torch.sort(torch.topk(score[i], keep).indices).values  # keep the original head order
        for suffix, key in keys.items():
            dim, parts = rules[suffix]
            idx, offset = [], 0
            for part in parts:
                size = (heads if part == "q" else kv) * head_dim
                chunk = size // kv  # one group's rows in this block
                idx += [offset + g * chunk + torch.arange(chunk) for g in kept.tolist()]
                offset += size
            new_state[key] = state[key].index_select(dim, torch.cat(idx).to(state[key].device)).contiguous()
    return rebuild(model, config, new_state)


def _layers(model: Any) -> tuple[dict[str, dict[str, str]], _Layout]:
    """{layer prefix: {layout suffix: state-dict key}} of every attention block, and the layout."""
    rules = head_layout(model.config)
    layers: dict[str, dict[str, str]] = {}
    for key in model.state_dict():
        for suffix in rules:
            if key.endswith(suffix):
                layers.setdefault(key[: -len(suffix)], {})[suffix] = key
    if not layers:
        raise ConfigError(f"head_sparsities: no attention tensors matching {sorted(rules)} in the model")
    return layers, rules


def _blocks(t: Any, dim: int, parts: tuple[str, ...], heads: int, kv: int, head_dim: int) -> list[Any]:
    """The q/k/v blocks of tensor t along dim, each moved to dim 0 (group g = chunk g of each block)."""
    sizes = [(heads if p == "q" else kv) * head_dim for p in parts]
    return [b.movedim(dim, 0) for b in t.split(sizes, dim=dim)]
