"""Numerics of a run: the autocast dtype (and why it was chosen), autocast itself, and seeds."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from typing import NamedTuple

from skillbook.errors import SkillbookError


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


# torch.compile on a CPU: Inductor's fused RMSNorm/RoPE/SwiGLU kernels make fp32 steady-state steps ~5-8 %
# faster (pretrain_throughput.py on a 2-core AVX2 EPYC: tiny 11.4K vs 10.8K tokens/s, small-25m 941 vs
# 871), but compiling costs 20-75 s before the first step, more than a short tiny run saves. Its default
# kernels also reduce in a thread-dependent order (three identical tiny runs ended at val loss 0.961,
# 0.977, 0.986); under torch.use_deterministic_algorithms they repeat bit for bit, so a CPU run that
# compiles turns that on. Compile from the same size at which bf16 starts to pay, and only in fp32: under
# bf16 autocast the compiled deterministic kernels were slower than eager (small-25m on a 2-core Zen 4
# with native bf16: 0.90x).
CPU_COMPILE_MIN_PARAMS = 5_000_000


def choose_compile(requested: bool | str, device: str, n_params: int, dtype: str = "float32") -> tuple[bool, str]:
    """Whether to torch.compile, and why: 'auto' -> on CUDA, and on CPU in fp32 from CPU_COMPILE_MIN_PARAMS."""
    if requested != "auto":
        return bool(requested), "set in the config"
    if device.startswith("cuda"):
        return True, "auto: CUDA"
    if n_params < CPU_COMPILE_MIN_PARAMS:
        return (
            False,
            f"auto: {n_params / 1e6:.1f}M params < {CPU_COMPILE_MIN_PARAMS / 1e6:.0f}M, "
            "compiling costs more than it saves",
        )
    if dtype != "float32":
        return False, f"auto: {dtype} autocast on CPU, where compiled kernels were no faster than eager"
    return True, "auto: CPU model large enough to amortise compilation; deterministic kernels"


def deterministic_compiled_cpu() -> None:
    """Make compiled CPU kernels reproducible (order-fixed reductions); warn, not fail, on an op without one."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
