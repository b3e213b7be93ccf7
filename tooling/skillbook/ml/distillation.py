"""Logit distillation helpers: the student's config (the teacher's family, fewer layers or a narrower width),
the teacher/student compatibility check, and the temperature-scaled KL(teacher || student) loss.

The loss is Hinton et al.'s: both distributions softened by T, KL from the teacher's to the student's,
multiplied by T^2 so its gradient keeps the same scale as cross-entropy's when T changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skillbook.errors import ConfigError


def _key(cfg: Any, name: str) -> str:
    """The config's own key for a standard name (GPT-2 calls num_hidden_layers n_layer)."""
    return dict(getattr(cfg, "attribute_map", {}) or {}).get(name, name)


def student_config(teacher: Any, layers: int | None, width: int | None) -> Any:
    """The teacher's config with `layers` decoder blocks (None = half, at least 1) and hidden size `width`
    (None = the teacher's): same family, vocabulary, head size and special ids, fewer parameters."""
    d = teacher.to_dict()
    kind = teacher.model_type
    n_layer, hidden = getattr(teacher, "num_hidden_layers", None), getattr(teacher, "hidden_size", None)
    heads = getattr(teacher, "num_attention_heads", None)
    if not (isinstance(n_layer, int) and isinstance(hidden, int) and isinstance(heads, int)):
        raise ConfigError(
            f"teacher: a {kind} config has no num_hidden_layers/hidden_size/num_attention_heads, so the recipe "
            "cannot build a smaller student of its family; pass student= (an hf-model on the same tokenizer)"
        )
    layers = layers or max(1, n_layer // 2)
    width = width or hidden
    if layers > n_layer or width > hidden or (layers, width) == (n_layer, hidden):
        raise ConfigError(
            f"layers/width: the student must be smaller than the teacher ({n_layer} layers x {hidden}); got "
            f"{layers} x {width}; lower layers (e.g. {max(1, n_layer // 2)}) or width"
        )
    d[_key(teacher, "num_hidden_layers")] = layers
    d.pop("layer_types", None)  # per-layer attention kinds (Gemma 2, Qwen): rebuilt for the new depth
    if width != hidden:
        head_dim = getattr(teacher, "head_dim", None) or hidden // heads
        if width % head_dim:
            raise ConfigError(
                f"width: {width} is not a multiple of the teacher's head size {head_dim}; pick a multiple "
                f"(e.g. {max(head_dim, width // head_dim * head_dim)}) so the student keeps its attention shape"
            )
        n_heads = width // head_dim
        d[_key(teacher, "hidden_size")] = width
        d[_key(teacher, "num_attention_heads")] = n_heads
        kv = getattr(teacher, "num_key_value_heads", None)
        if isinstance(kv, int):  # keep the GQA ratio where it divides, else full heads
            ratio = max(1, heads // kv)
            d["num_key_value_heads"] = n_heads // ratio if n_heads % ratio == 0 else n_heads
        for ffn in ("intermediate_size", "n_inner"):
            if isinstance(d.get(ffn), int):
                d[ffn] = max(16, round(d[ffn] * width / hidden / 16) * 16)
    return type(teacher).from_dict(d)


def tokenizer_mismatch(teacher_dir: str | Path, student_dir: str | Path) -> str | None:
    """Why a student cannot learn the teacher's distribution (None = same vocabulary, specials and logit width).
    KL compares the two distributions position by position and id by id, so both must use the same ids."""
    from transformers import AutoConfig

    from skillbook.ml.tokenizer_utils import tokenizer_mismatch as same_ids

    if why := same_ids(teacher_dir, student_dir):
        return why
    vt, vs = (
        AutoConfig.from_pretrained(str(teacher_dir)).vocab_size,
        AutoConfig.from_pretrained(str(student_dir)).vocab_size,
    )
    return None if vt == vs else f"output widths differ (vocab_size {vt} vs {vs})"


def kd_loss(student_logits, teacher_logits, temperature: float):
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)), the mean over positions (forward KL: the
    student must cover every token the teacher gives mass to)."""
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
