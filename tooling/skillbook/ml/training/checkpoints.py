"""Checkpoints: atomic writes (temp file + rename), keep the newest K, full state under DDP and FSDP, RNG.

A checkpoint holds everything `resume=auto` needs to continue exactly: model and optimizer state
(full, unsharded, on the CPU), the data position and every RNG state the loop draws from.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from skillbook.ml.training.distributed import unwrap_compiled


def rng_state() -> dict:
    """Every RNG state a training loop may draw from, as tensors, ints and tuples (loads with weights_only)."""
    import torch

    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": (version, list(internal), gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts, the same under single, DDP and FSDP.

    A collective under FSDP: every rank calls it, rank 0 writes.
    """
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
    """Read a checkpoint written by `save_checkpoint` onto the CPU.

    `weights_only=True`: tensors and plain containers only, so a planted checkpoint cannot run code.
    """
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
