"""What env.json records about a run: python, platform, library versions, git sha, threads, device.

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


def env_info(root: Path, device: str | None = None, dtype: str | None = None) -> dict:
    """env.json's content; `device` and `dtype` are what the recipe used (ctx.device, ctx.dtype), if it said."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
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
    return info
