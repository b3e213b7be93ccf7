"""Training utilities shared by recipes: device and dtype, seeding, AdamW groups, lr schedule, MFU,
atomic checkpoints and DDP/FSDP set-up.

Everything here is small and explicit on purpose (nanoGPT style): a recipe reads top to bottom and
calls these helpers where a reader would expect the code, without a framework in between. Torch is
imported inside functions so importing this module stays cheap.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from skillbook.errors import SkillbookError

# ---------------------------------------------------------------------------------------------
# Device, dtype, seeding
# ---------------------------------------------------------------------------------------------


def pick_device(requested: str = "auto", local_rank: int = 0) -> str:
    """'auto' -> cuda:<local_rank> when a GPU is there, else cpu; an explicit choice is checked."""
    import torch

    if requested == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SkillbookError(f"device: {requested!r} asked for but no CUDA GPU is visible; use device=auto or cpu")
    return requested


def cpu_bf16_fast() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX512-BF16 / AMX); without them bf16 matmuls crawl."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# bf16 autocast on a CPU with native bf16 (AVX512-BF16/AMX) pays a cast per op; below a few million
# parameters the casts cost more than the faster matmuls save. pretrain_throughput.py on a 2-core Xeon
# with AMX: tiny (0.98M) fp32 17.9K vs bf16 14.5K tokens/s; small-25m bf16 2.5K vs fp32 1.5K. The rule
# puts the switch between the two measured sizes.
CPU_BF16_MIN_PARAMS = 5_000_000
AUTO_DTYPE_ENV = "SKILLBOOK_AUTO_DTYPE"  # what dtype=auto resolves to when set: bfloat16 or float32


class DtypeChoice(NamedTuple):
    dtype: str
    reason: str


def choose_dtype(requested: str, device: str, n_params: int | None = None) -> DtypeChoice:
    """The autocast dtype and why: 'auto' -> bf16 on bf16 GPUs, and on CPUs with native bf16 for models of
    at least CPU_BF16_MIN_PARAMS parameters; else fp32. `SKILLBOOK_AUTO_DTYPE` overrides what auto picks
    (the test suite forces bf16 with it, so bf16-only failures show on any CPU).

    fp16 is never chosen automatically: it needs a GradScaler, and bf16 GPUs (A100 and later) make it moot.
    """
    import torch

    if requested != "auto":
        if requested == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise SkillbookError("dtype: bfloat16 is not supported on this GPU (pre-Ampere); use float32 or auto")
        return DtypeChoice(requested, "set in the config")
    forced = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if forced:
        if forced not in ("bfloat16", "float32"):
            raise SkillbookError(f"{AUTO_DTYPE_ENV}={forced!r}: must be bfloat16 or float32 (or unset)")
        return DtypeChoice(forced, f"auto, forced by {AUTO_DTYPE_ENV}")
    if device.startswith("cuda"):
        ok = torch.cuda.is_bf16_supported()
        return DtypeChoice("bfloat16" if ok else "float32", "auto: bf16 GPU" if ok else "auto: GPU without bf16")
    if not cpu_bf16_fast():
        return DtypeChoice("float32", "auto: no native bf16 on this CPU")
    if n_params is not None and n_params < CPU_BF16_MIN_PARAMS:
        return DtypeChoice(
            "float32",
            f"auto: native bf16 CPU, but {n_params / 1e6:.1f}M params < "
            f"{CPU_BF16_MIN_PARAMS / 1e6:.0f}M (casts cost more than bf16 saves)",
        )
    return DtypeChoice("bfloat16", "auto: native bf16 CPU")


def pick_dtype(requested: str, device: str, n_params: int | None = None) -> str:
    """choose_dtype's dtype alone."""
    return choose_dtype(requested, device, n_params).dtype


def autocast(device: str, dtype: str):
    """torch.autocast for bf16/fp16, a no-op context for fp32 (so the loop has one code path)."""
    import torch

    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if present) and torch on every device."""
    import torch

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG state a training loop may draw from, for checkpoints."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# FLOPs, peak and MFU
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Who this process is in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group (nccl on GPUs, gloo on CPU); a plain process gets world size 1."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if d.enabled and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return d


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op in a single process)."""
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(value, d: Dist):
    """Sum a tensor over ranks, in place (unchanged in a single process)."""
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value, d: Dist):
    """Average a tensor over ranks (unchanged in a single process)."""
    return all_reduce_sum(value, d) / d.world_size if d.enabled else value


def broadcast_object(obj, d: Dist):
    """Rank 0's value of a picklable object on every rank (e.g. which checkpoint to resume from)."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_gradients(model, d: Dist, last: bool):
    """Gradient accumulation: all-reduce only on the last micro-step (DDP no_sync / FSDP2 sync flag)."""
    if not d.enabled:
        return nullcontext()
    inner = unwrap_compiled(model)
    if hasattr(inner, "no_sync"):
        return nullcontext() if last else inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(last)
    return nullcontext()


def teardown_distributed(d: Dist) -> None:
    """Leave the process group so torchrun exits cleanly."""
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model, d: Dist, device: str, strategy: str = "ddp"):
    """DDP (every rank holds the full model, gradients all-reduced) or FSDP2 (parameters sharded per layer)."""
    if not d.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # shard each decoder block, then the rest (embeddings, norm, head)
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.local_rank] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic (temp file + rename), keep the last K
# ---------------------------------------------------------------------------------------------


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts, the same under single, DDP and FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(unwrap_compiled(model), optimizer, options=opts)


def load_full_state(model, optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Inverse of `full_state`: every rank loads the full dicts (FSDP re-shards them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        unwrap_compiled(model),
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )


def unwrap_compiled(model):
    """Strip torch.compile's wrapper only (DDP/FSDP stay, the state-dict helpers understand them)."""
    return getattr(model, "_orig_mod", model)


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """Write `ckpt_dir/step_000123.pt` atomically and delete all but the newest `keep` checkpoints.

    torch.save goes to a temp file that is fsynced and renamed: a process killed mid-write leaves the
    previous checkpoint intact and at worst a stray .tmp, never a truncated step_*.pt.
    """
    import torch

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:06d}.pt"
    tmp = ckpt_dir / f".{final.name}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest finished checkpoint, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by `save_checkpoint` onto the CPU."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are pickled


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


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
