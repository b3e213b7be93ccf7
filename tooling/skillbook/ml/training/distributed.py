"""Distributed set-up and collectives: torchrun's process group, this rank's device, DDP/FSDP wrapping.

Who this process is (rank, world size, local rank) is read once from torchrun's environment by the
RunContext; `ctx.setup_device()` calls `setup` here. Everything else asks the process group torch
already holds, so no second record of the rank can drift from the first, and every helper is a no-op
in a single process: a recipe has one code path for 1 and N processes.
"""

from __future__ import annotations

from contextlib import nullcontext

from skillbook.errors import SkillbookError


def pick_device(requested: str = "auto", local_rank: int = 0) -> str:
    """'auto' -> cuda:<local_rank> when a GPU is there, else cpu; an explicit choice is checked."""
    import torch

    if requested == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SkillbookError(f"device: {requested!r} asked for but no CUDA GPU is visible; use device=auto or cpu")
    return requested


def setup(requested: str, world_size: int, local_rank: int) -> tuple[str, bool]:
    """(this rank's device, whether this call joined the process group).

    With world_size > 1 it joins torchrun's group: nccl on GPUs (after pinning the rank to its GPU),
    gloo on CPU. Whoever joined tears down (`teardown`), so torchrun's workers exit cleanly.
    """
    import torch
    import torch.distributed as dist

    device = pick_device(requested, local_rank)
    if world_size == 1 or dist.is_initialized():
        return device, False
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device, True


def world_size() -> int:
    """Processes in the joined group; 1 when none was joined."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(value):
    """Sum a tensor over ranks, in place (unchanged in a single process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value):
    """Average a tensor over ranks (unchanged in a single process)."""
    n = world_size()
    return all_reduce_sum(value) / n if n > 1 else value


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank (e.g. which checkpoint to resume from)."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap_compiled(model):
    """Strip torch.compile's wrapper only (DDP/FSDP stay, the state-dict helpers understand them)."""
    return getattr(model, "_orig_mod", model)


def sync_gradients(model, last: bool):
    """Gradient accumulation: all-reduce only on the last micro-step (DDP no_sync / FSDP2 sync flag)."""
    if world_size() == 1:
        return nullcontext()
    inner = unwrap_compiled(model)
    if hasattr(inner, "no_sync"):
        return nullcontext() if last else inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(last)
    return nullcontext()


def wrap_model(model, device: str, strategy: str = "ddp"):
    """DDP (every rank holds the full model, gradients all-reduced) or FSDP2 (parameters sharded per layer).

    Unchanged in a single process. FSDP2 shards in place, so the caller's reference sees the shards.
    """
    if world_size() == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # shard each decoder block, then the rest (embeddings, norm, head)
            fully_shard(layer)
        fully_shard(model)
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if device.startswith("cuda") else None  # set to local_rank by setup
    return DistributedDataParallel(model, device_ids=ids)


def teardown() -> None:
    """Leave the process group so torchrun exits cleanly (no-op when none was joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
