"""Pruning helpers: unstructured magnitude pruning with torch.nn.utils.prune, structured MLP-width pruning
that builds a really smaller model, a short healing fine-tune, and the numbers that compare them.

- `prunable`: the weight matrices of the decoder blocks (nn.Linear, and transformers' Conv1D in GPT-2);
  embeddings and the LM head are left dense (often tied, and pruning them hurts most).
- `magnitude_prune` / `make_permanent`: global L1 (`prune.global_unstructured`), masks kept during healing
  so pruned weights stay zero, then `prune.remove` folds the mask into the weight.
- `mlp_layout` / `shrink_mlp`: per family, which tensors hold the MLP's intermediate channels; the channels
  with the lowest importance (product of the L2 norms of their gate row, up row and down column) go, in
  every layer alike, into a model built from a config with a smaller intermediate size (`rebuild`, which
  skillbook.ml.head_pruning reuses for attention heads).
- `heal`: plain causal-LM training with torch AdamW on random windows of the corpus.

Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from skillbook.errors import ConfigError

# model_type -> (config attribute of the intermediate size, {parameter suffix: (channel dim, fused parts)}).
# A fused tensor (phi3's gate_up_proj) stacks `parts` blocks of `intermediate` rows; channel j is row j of each.
_LLAMA_STYLE = {
    "mlp.gate_proj.weight": (0, 1),
    "mlp.up_proj.weight": (0, 1),
    "mlp.down_proj.weight": (1, 1),
    "mlp.gate_proj.bias": (0, 1),
    "mlp.up_proj.bias": (0, 1),
}
MLP_LAYOUTS: dict[str, tuple[str, dict[str, tuple[int, int]]]] = {
    **{t: ("intermediate_size", _LLAMA_STYLE) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": ("intermediate_size", {"mlp.gate_up_proj.weight": (0, 2), "mlp.down_proj.weight": (1, 1)}),
    "gpt2": ("n_inner", {"mlp.c_fc.weight": (1, 1), "mlp.c_fc.bias": (0, 1), "mlp.c_proj.weight": (0, 1)}),
}


# ---------------------------------------------------------------------------------------------
# Unstructured: global magnitude pruning of the blocks' weight matrices
# ---------------------------------------------------------------------------------------------


def prunable(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of every 2-D weight matrix in the decoder blocks: nn.Linear and GPT-2's Conv1D."""
    import torch
    from transformers.pytorch_utils import Conv1D

    skip = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | Conv1D) and id(m) not in skip and "lm_head" not in name
    ]


def magnitude_prune(model: Any, sparsity: float) -> None:
    """Zero the `sparsity` share of smallest |w| across all prunable matrices (one global threshold).
    The masks stay attached (weight = weight_orig * weight_mask) until `make_permanent`."""
    from torch.nn.utils import prune

    params = [(m, "weight") for _, m in prunable(model)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)


def make_permanent(model: Any) -> None:
    """Fold every pruning mask into its weight (prune.remove): a plain model that saves and reloads."""
    from torch.nn.utils import prune

    for _, m in prunable(model):
        if prune.is_pruned(m):
            prune.remove(m, "weight")


def sparsity(model: Any) -> float:
    """Share of exact zeros over the prunable matrices."""
    mats = [m.weight for _, m in prunable(model)]
    return sum(int((w == 0).sum()) for w in mats) / sum(w.numel() for w in mats)


# ---------------------------------------------------------------------------------------------
# Structured: drop MLP channels, build the smaller model
# ---------------------------------------------------------------------------------------------


def mlp_layout(config: Any) -> tuple[str, dict[str, tuple[int, int]]]:
    """The MLP layout of a config's family, or one ConfigError naming what is missing."""
    if config.model_type not in MLP_LAYOUTS:
        raise ConfigError(
            f"structured: model_type {config.model_type!r} has no known MLP layout (supported: "
            f"{', '.join(sorted(MLP_LAYOUTS))}: gate_proj/up_proj/down_proj, phi3's fused gate_up_proj, gpt2's "
            f"c_fc/c_proj); set mlp_sparsities: [] for unstructured pruning only"
        )
    return MLP_LAYOUTS[config.model_type]


def intermediate_size(config: Any) -> int:
    attr, _ = mlp_layout(config)
    value = getattr(config, attr, None)
    return int(value) if value is not None else 4 * int(config.n_embd)  # gpt2: n_inner None = 4 x width


def _channels(t: Any, dim: int, parts: int, n: int) -> list[Any]:
    """The `parts` blocks of n channels of tensor t along dim, each moved to dim 0: [n, ...]."""
    return [t.narrow(dim, p * n, n).movedim(dim, 0) for p in range(parts)]


def shrink_mlp(model: Any, drop: float) -> Any:
    """A new model whose MLPs keep round((1 - drop) x intermediate) channels, the most important in each layer.

    Importance of channel j = product of the L2 norms of its slices in every MLP weight (gate row, up row,
    down column): a channel with a near-zero slice anywhere contributes little to the block's output.
    """
    import torch

    attr, rules = mlp_layout(model.config)
    n = intermediate_size(model.config)
    keep_n = max(1, round(n * (1 - drop)))
    state = model.state_dict()
    layers: dict[str, dict[str, Any]] = {}
    for key in state:
        for suffix in rules:
            if key.endswith(suffix):
                layers.setdefault(key[: -len(suffix)], {})[suffix] = key
    new_state = dict(state)
    for keys in layers.values():
        score = torch.ones(n, dtype=torch.float64)
        for suffix, key in keys.items():
            if suffix.endswith(".weight"):
                dim, parts = rules[suffix]
                for block in _channels(state[key].detach(), dim, parts, n):
                    score *= block.double().flatten(1).norm(dim=1)
        kept = torch.sort(torch.topk(score, keep_n).indices).values  # keep the original channel order
        for suffix, key in keys.items():
            dim, parts = rules[suffix]
            idx = torch.cat([kept + p * n for p in range(parts)])
            new_state[key] = state[key].index_select(dim, idx.to(state[key].device)).contiguous()
    config = copy.deepcopy(model.config)
    setattr(config, attr, keep_n)
    return rebuild(model, config, new_state)


def rebuild(model: Any, config: Any, state: dict[str, Any]) -> Any:
    """A new model of `config` (same dtype, device and generation config as `model`) holding `state`, loaded
    strictly: every tensor of the smaller model must come from the edited state dict, none left over."""
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    small.load_state_dict(state, strict=True)
    small.generation_config = model.generation_config
    return small.to(model.device)


# ---------------------------------------------------------------------------------------------
# Healing and measuring
# ---------------------------------------------------------------------------------------------


def heal(model: Any, sampler: Any, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """`steps` AdamW steps of next-token loss on sampler windows (masks, if any, keep pruned weights at 0)."""
    import torch

    if steps == 0:
        return []
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        x, y = sampler.windows(sampler.take(batch_size))
        logits = model(input_ids=x.to(model.device)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.to(model.device).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def tokens_per_second(model: Any, prompt: list[int], new_tokens: int, repeats: int = 3) -> float:
    """Greedy decode speed (best of `repeats`, KV cache on, EOS ignored so every model does the same work)."""
    from skillbook.ml.speculative import generate

    generate(model, prompt, 2)  # warm-up
    best = min(generate(model, prompt, new_tokens).seconds for _ in range(repeats))
    return new_tokens / max(best, 1e-9)


def safetensors_bytes(path: str | Path) -> int | None:
    """Total size of the *.safetensors files of a local model dir (None for a hub id)."""
    folder = Path(path)
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) if files else None
