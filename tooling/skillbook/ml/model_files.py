"""Model inputs checked before anything loads: a .gguf file's magic, an hf-model dir's config.json, model_type
and safetensors headers. A truncated download or a wrong path then fails with one message naming the file,
instead of a SafetensorError or llama.cpp ValueError traceback after minutes of set-up."""

from __future__ import annotations

import json
from pathlib import Path

from skillbook.errors import ConfigError


def check_model_type(config_file: Path, field: str = "model") -> str:
    """The model_type of a local config.json, refused with one message when transformers cannot build it."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"{field}: {config_file} is not a readable config.json ({exc}); re-save the model") from None
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError(
            f"{field}: {config_file} has model_type {model_type!r}, which transformers "
            f"{transformers.__version__} cannot build; pass a model of a supported family "
            f"(llama, mistral, qwen2, qwen3, gemma2, phi3, gpt2, … see the README's support table)"
        )
    return str(model_type)


def check_gguf(path: Path, field: str = "model") -> None:
    """A .gguf file starts with the 4-byte magic b'GGUF'; anything else is not one (or is truncated to nothing)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path} ({exc.strerror})") from None
    if magic != b"GGUF":
        raise ConfigError(
            f"{field}: {path} is not a GGUF file (it does not start with 'GGUF'); pass the `gguf` output of "
            f"`skills run quantization`"
        )


def check_hf_dir(path: Path, field: str = "model") -> None:
    """config.json with a known model_type, and weight files whose safetensors headers parse."""
    from safetensors import safe_open

    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{field}: {path} is not a Hugging Face model directory (no config.json); pass the 'model' output of "
            f"a pretraining/sft run or a save_pretrained directory"
        )
    check_model_type(path / "config.json", field)
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not list(path.glob("pytorch_model*.bin")):
        raise ConfigError(f"{field}: {path} has config.json but no weights (*.safetensors); re-save the model")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
            raise ConfigError(
                f"{field}: {shard} is not a readable safetensors file ({str(exc).splitlines()[0][:120]}); "
                f"the file is damaged or truncated, re-save or re-download the model"
            ) from None


def check_model_path(path: str | Path, field: str = "model") -> None:
    """Whatever a `model` field points at locally: a .gguf file or an hf-model dir (hub ids are not checked)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        check_gguf(p, field)
    elif p.is_dir():
        check_hf_dir(p, field)


def input_problems(path: str | Path, field: str) -> list[str]:
    """A local model input that will not load (no config.json or weights, an unknown model_type, a damaged
    safetensors header, a file that is not GGUF) as a problem line, for the input check that runs before
    a run dir exists."""
    try:
        check_model_path(path, field)
    except ConfigError as exc:
        return [f"  {exc}"]
    return []
