"""What env.json records about a run: python, platform, CPU, library versions, git sha, threads, device.

The versions are the ones a skill's tested-with stamps are compared against; the device and dtype the
recipe actually used (ctx.device, ctx.dtype) are added by the runner.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "tokenizers",
    "sentencepiece",
    "datasets",
    "accelerate",
    "gguf",
    "llama_cpp_python",
    "onnxruntime",
    "vllm",
    "pydantic",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the tracked packages (missing ones are left out)."""
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name.replace("_", "-")] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def git_sha(root: Path) -> str | None:
    """The checked-out commit, or None outside a git checkout."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_info() -> str:
    """'AMD EPYC, family 25 model 17 (avx512_bf16)': the CPU kind and its native-bf16 flags, which decide
    `dtype: auto` and which fp32 kernels run (numbers differ between CPU kinds). Linux; elsewhere the arch."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f", family {fields['cpu family']} model {fields['model']}"
    flags = fields.get("flags", "").split()
    native: list[str] = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if not native and "avx2" in flags:
        native = ["avx2, no native bf16"]
    return f"{name} ({', '.join(native)})" if native else name


def env_info(root: Path, device: str | None = None, dtype: str | None = None) -> dict:
    """env.json's content; `device` and `dtype` are what the recipe used (ctx.device, ctx.dtype), if it said."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "git_sha": git_sha(root),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    torch = sys.modules.get("torch")  # only describe the device if the recipe already loaded torch
    if torch is not None:
        info["device"] = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_threads"] = torch.get_num_threads()
    if dtype:
        info["dtype"] = dtype
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    if os.environ.get("SKILLBOOK_AUTO_DTYPE"):  # the suite's forced-bf16 pass: dtype auto did not choose
        info["auto_dtype_forced"] = os.environ["SKILLBOOK_AUTO_DTYPE"]
    return info
