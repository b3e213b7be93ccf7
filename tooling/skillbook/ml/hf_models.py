"""Models for the post-training recipes: resolve the `model` input with one clear error, load the
tokenizer and the causal LM in the dtype the Precision block asks for, build the LoRA adapter from
the LoRA block (its targets checked first against a weightless skeleton of the model), and merge an
adapter into its base with a logits check.

Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from skillbook.errors import ConfigError, SkillbookError
from skillbook.ml.model_files import check_hf_dir
from skillbook.run.blocks import LoRA

# ---------------------------------------------------------------------------------------------
# The `model` reference: fail fast, before anything large is loaded
# ---------------------------------------------------------------------------------------------


def resolve_model(ref: str | Path, field: str = "model") -> str:
    """A loadable model reference: a local hf-model dir, or a hub id reachable now. Fails fast otherwise."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{field}: {path} is not a Hugging Face model directory (no config.json); pass the "
                f"'model' output of a pretraining/sft run or a save_pretrained directory"
            )
        check_hf_dir(path, field)
        return str(path)
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if looks_local or offline:
        why = "no such directory" if looks_local else "no such directory, and HF_HUB_OFFLINE=1 forbids the hub"
        raise ConfigError(
            f"{field}: {ref!r} cannot be loaded ({why}); pass a local hf-model directory, "
            f"e.g. the 'model' output of `skills run pretraining`"
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(ref)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many classes; all mean the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{field}: {ref!r} is neither a local directory nor a reachable hub model ({first[:160]}); "
            f"pass a local hf-model directory"
        ) from None
    return ref


# ---------------------------------------------------------------------------------------------
# Loading: tokenizer with a pad token, model in the asked-for dtype
# ---------------------------------------------------------------------------------------------


def quiet_progress_bars() -> None:
    """Per-map and per-shard progress bars from datasets/transformers drown the run's own log lines."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(ref: str):
    """The model's tokenizer with a pad token (TRL pads batches; fall back to eos, as most chat models do)."""
    from transformers import AutoTokenizer

    quiet_progress_bars()

    tok = AutoTokenizer.from_pretrained(ref)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise SkillbookError(
            f"model: the tokenizer in {ref} has no eos token; post-training needs one so the "
            f"model learns where an answer ends"
        )
    return tok


def weights_dtype(weights: str):
    """The torch dtype for Precision.weights: auto = bfloat16 on CUDA (half the memory), float32 on CPU."""
    import torch

    if weights == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[weights]


def load_causal_lm(ref: str, quantization: str = "none", weights: str = "auto"):
    """AutoModelForCausalLM with its weights in `weights` (see weights_dtype), or in 4-bit NF4 (QLoRA,
    needs CUDA + bitsandbytes) with bfloat16 compute."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": weights_dtype(weights)}
    if quantization == "4bit":
        if not torch.cuda.is_available():
            raise ConfigError(
                "quantization: '4bit' (QLoRA) needs a CUDA GPU and bitsandbytes; use quantization: none on CPU"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return AutoModelForCausalLM.from_pretrained(ref, **kwargs)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Adapters: the LoRA config, and merging an adapter back into its base (verified)
# ---------------------------------------------------------------------------------------------


def model_skeleton(ref: str, task_type: str = "CAUSAL_LM"):
    """The model built from its config.json on the meta device: every module, no weights read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(ref, num_labels=1)  # num_labels: the reward model's one-output head
    auto = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def linear_layers(model) -> list[str]:
    """Dotted names of the Linear and Conv1D (GPT-2) layers: what PEFT's 'all-linear' starts from."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def lora_targets(ref: str, lora: LoRA, task_type: str = "CAUSAL_LM") -> list[str]:
    """The layer-name suffixes LoRA will adapt on `ref`, read from a weightless skeleton of the model.

    'all-linear' is PEFT's rule: every Linear/Conv1D layer but the output head (lm_head, or the score
    head of a reward model, which trains fully). An explicit list must have every entry match a layer
    (PEFT matches a name or a dotted suffix); otherwise ConfigError names the model's linear layers.
    """
    import torch

    model = model_skeleton(ref, task_type)
    linear = linear_layers(model)
    if lora.targets == "all-linear":
        heads = [model.get_output_embeddings(), getattr(model, "score", None)]
        head_names = {name for name, m in model.named_modules() if any(m is h for h in heads if h is not None)}
        return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear if n not in head_names))
    adaptable = linear + [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))
    unmatched = [t for t in lora.targets if not any(n == t or n.endswith(f".{t}") for n in adaptable)]
    if unmatched:
        arch = getattr(model.config, "model_type", "this model")
        verb = "matches" if len(unmatched) == 1 else "match"
        raise ConfigError(
            f"lora.targets: {', '.join(map(repr, unmatched))} {verb} no layer of {ref} ({arch}); its linear "
            f"layers are {', '.join(suffixes)}. Set lora.targets to some of them (comma-separated), or to "
            f"'all-linear' (the default: every linear layer but the output head)"
        )
    return list(lora.targets)


def lora_config(lora: LoRA, task_type: str = "CAUSAL_LM"):
    """A PEFT LoraConfig from the LoRA block; `targets` are 'all-linear' or module-name suffixes."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.targets if isinstance(lora.targets, str) else list(lora.targets),
        task_type=task_type,
        bias="none",
    )


def merge_and_save(peft_model, tok, out_dir: Path, probe_texts: list[str], atol: float = 1e-4) -> float:
    """Merge LoRA weights into the base, save model + tokenizer, reload and check logits match.

    Returns the largest absolute logit difference between the adapter model and the reloaded
    merged model on `probe_texts` (a padded batch of a few real prompts); raises SkillbookError if
    it exceeds `atol` (a merge that changes outputs is a bug).
    """
    import torch
    from transformers import AutoModelForCausalLM

    peft_model.eval()
    batch = tok(probe_texts, return_tensors="pt", padding=True)
    batch = {k: v.to(peft_model.device) for k, v in batch.items()}
    with torch.no_grad():
        before = peft_model(**batch).logits.float().cpu()
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=merged.dtype).to(merged.device).eval()
    with torch.no_grad():
        after = reloaded(**batch).logits.float().cpu()
    mask = batch["attention_mask"].bool().cpu()
    diff = (before - after).abs()[mask].max().item()
    tol = atol if merged.dtype == torch.float32 else 5e-2  # bf16 rounding after merge is ~1e-2
    if not diff <= tol:
        raise SkillbookError(
            f"merged model logits differ from adapter logits by {diff:.3g} (> {tol}); "
            f"the merge in {out_dir} is not faithful"
        )
    return diff


def reload_adapter_bf16(base_ref: str, adapter_dir: Path):
    """Base in bf16 + the saved adapter: the faithful way to merge a QLoRA adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=torch.bfloat16)
    return PeftModel.from_pretrained(base, adapter_dir)
