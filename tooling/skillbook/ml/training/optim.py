"""The optimizer and its schedule: AdamW with weight decay on matrices only, linear warmup + cosine decay."""

from __future__ import annotations

import math


def adamw(model, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool = True):
    """AdamW with decoupled weight decay on matrices only: norms, biases (1-D tensors) are not decayed.

    Embeddings are 2-D and decayed, as in nanoGPT and Llama. `fused=True` uses the single-kernel
    implementation (CUDA and, since torch 2.4, CPU); it computes the same update as the default one.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to `min_lr` at `total` (a pure function of step)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
