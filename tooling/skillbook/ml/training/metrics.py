"""What a training run measures and shows: FLOPs per token, the achievable matmul peak for MFU, the bytes this
rank holds, loss plots."""

from __future__ import annotations

import time
from pathlib import Path

from skillbook.ml.training.precision import cpu_bf16_fast


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward 2N + backward 4N) plus 12*L*d*T for attention.

    N counts each weight once (tied embedding = lm_head); the embedding lookup itself is free but the
    lm_head matmul is not, so with tied weights counting the shared matrix once is right (PaLM appendix B).
    """
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def measure_peak_flops(
    device: str, dtype: str = "float32", n: int = 2048, reps: int = 10, budget_s: float = 1.5
) -> float:
    """Achievable matmul FLOP/s on this device and dtype: the fastest of up to `reps` n x n matmuls.

    The fastest rep, not the mean: on a shared machine other processes steal time, and the peak is what
    the hardware can do (under heavy load even the fastest rep is slowed, and MFU reads high). bf16 on a
    CPU without native bf16 runs ~1 GFLOP/s, so it is probed at 256 x 256 there.
    """
    import torch

    if dtype != "float32" and device == "cpu" and not cpu_bf16_fast():
        n = 256
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    (a @ b).sum().item()  # warm-up: kernel choice, allocation
    best, start = float("inf"), time.perf_counter()
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        c = a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    del c
    return 2.0 * n**3 / best


def rank_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this process: FSDP2's DTensor shards count
    their local shard only, so DDP (full replicas) vs FSDP (1/world) shows in the numbers."""
    import torch

    def local(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "param_bytes": sum(local(p) for p in params),
        "grad_bytes": sum(local(p.grad) for p in params if p.grad is not None),
        "optimizer_bytes": sum(local(v) for v in state),
    }


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    """Loss curves (name -> [(step, loss)]) on a log axis as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=name, marker="o" if len(points) < 20 else None)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
