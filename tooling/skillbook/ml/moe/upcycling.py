"""Sparse upcycling (Komatsuzaki et al. 2022): a dense Llama -> a Mixtral whose every expert is a copy of
the dense MLP, and the check that refuses any other source before data or weights are touched.
"""

from __future__ import annotations

import json
from pathlib import Path

from skillbook.errors import SkillbookError

_SHARED_CONFIG = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
)


def check_upcycle_source(ref: str | Path) -> Path | str:
    """Refuse anything but a bias-free Llama as upcycling source, before any data or weights are touched.

    A local directory is checked through its config.json; a hub id through AutoConfig (online only).
    """
    path = Path(ref).expanduser()
    if path.exists():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise SkillbookError(
                f"dense_model: {path} has no config.json; pass an hf-model directory (the "
                f"'model' output of `skills run pretraining`)"
            )
        cfg, where = json.loads(cfg_file.read_text()), str(cfg_file)
    else:
        from transformers import AutoConfig

        cfg, where = AutoConfig.from_pretrained(str(ref)).to_dict(), str(ref)
    kind = cfg.get("model_type")
    if kind != "llama":
        raise SkillbookError(
            f"dense_model: upcycling needs a Llama-architecture model (model_type 'llama'), got "
            f"{kind!r} from {where}; only a Llama MLP (gate/up/down) maps exactly onto Mixtral's "
            f"experts. Use init=scratch, or upcycle a Llama checkpoint"
        )
    if cfg.get("mlp_bias") or cfg.get("attention_bias"):
        raise SkillbookError(
            "dense_model: the Llama uses biases (mlp_bias/attention_bias), which Mixtral has no "
            "place for; upcycle a bias-free Llama or use init=scratch"
        )
    return path if path.exists() else str(ref)


def mixtral_config_from_llama(dense_cfg, num_experts: int, top_k: int, **moe_kwargs):
    """A MixtralConfig with the dense model's shape, plus the MoE settings."""
    from transformers import MixtralConfig

    shared = {k: getattr(dense_cfg, k) for k in _SHARED_CONFIG if getattr(dense_cfg, k, None) is not None}
    return MixtralConfig(
        **shared, num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None, **moe_kwargs
    )


def upcycle(dense, num_experts: int, top_k: int, seed: int = 0, **moe_kwargs):
    """Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as an exact copy of the dense MLP.

    Mixtral renormalises the top-k router weights to sum to 1, so k identical experts give exactly the
    dense MLP's output: the upcycled model computes the dense model's function at step 0, whatever the
    (random) router says. Attention, norms, embeddings and head are copied unchanged.
    """
    import torch
    from transformers import MixtralForCausalLM

    if dense.config.model_type != "llama":
        raise SkillbookError(f"dense_model: upcycling needs a Llama model, got {dense.config.model_type!r}")
    torch.manual_seed(seed)  # the only new weights are the routers
    moe = MixtralForCausalLM(mixtral_config_from_llama(dense.config, num_experts, top_k, **moe_kwargs))
    moe = moe.to(dense.dtype)
    src = dense.state_dict()
    dst = moe.state_dict()
    new = {}
    for name, value in src.items():
        if ".mlp." not in name:
            new[name] = value
    for i in range(dense.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate_up = torch.cat([src[p + "gate_proj.weight"], src[p + "up_proj.weight"]], dim=0)  # [2I, H]
        new[p + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        new[p + "experts.down_proj"] = src[p + "down_proj.weight"].unsqueeze(0).repeat(num_experts, 1, 1)
        new[p + "gate.weight"] = dst[p + "gate.weight"]  # keep the fresh router init
    missing, unexpected = moe.load_state_dict(new, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not moe.config.tie_word_embeddings]
    if missing or unexpected:
        raise SkillbookError(f"upcycling: weights did not map (missing {missing[:4]}, unexpected {unexpected[:4]})")
    if moe.config.tie_word_embeddings:
        moe.tie_weights()
    return moe
