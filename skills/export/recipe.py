"""Export: an hf-model as ONNX (checked against torch in onnxruntime) and as a hub-ready folder.

ONNX: torch.onnx.export (the dynamo exporter) of a KV-cache-free forward, input_ids +
attention_mask -> logits, with dynamic batch and sequence axes; onnxruntime then runs the file
on fresh inputs of other shapes (padding included) and the max |logit difference| vs torch is
recorded. Hub folder: safetensors weights, the tokenizer, generation config and a README.md
model card (Hugging Face format: YAML metadata + sections), ready for `hf upload`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from skillbook.errors import ConfigError
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"onnx": "onnx", "model": "hf-model"}
INPUTS = {"model": "hf-model"}


class Config(RecipeConfig):
    model: str = Field(..., description="hf-model directory (tokenizer inside) to export, e.g. the sft or dpo output.")
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo",
        description=(
            "dynamo: torch.export + onnxscript, the maintained path (~30-50 s here); "
            "torchscript: the legacy tracer, frozen but ~20x faster to run (~2 s)."
        ),
    )
    opset: int = Field(
        18, ge=17, le=23, description="ONNX opset. 18 is what the dynamo exporter targets and onnxruntime >= 1.16 runs."
    )
    max_seq_len: int | None = Field(
        None, ge=2, description="Upper bound of the dynamic sequence axis; None = the model's max_position_embeddings."
    )
    parity_tolerance: float = Field(
        1e-3,
        gt=0,
        description="Max |logit difference| torch vs onnxruntime (fp32) before the run fails. Observed: ~1e-5.",
    )
    parity_batches: int = Field(
        3, ge=1, description="Random batches (different shapes, one left-padded) in the parity check."
    )
    repo_id: str = Field(
        "your-name/skillbook-tiny-llama", description="Hub repo id written into the model card's usage snippet."
    )
    license: str = Field("apache-2.0", description="License identifier in the model card metadata.")
    base_model: str | None = Field(
        None, description="Hub id of the base model this was fine-tuned from, for the card's base_model field."
    )
    language: Literal["en"] = Field("en", description="Language tag in the model card metadata.")
    seed: int = Field(0, description="Seed for the parity-check inputs.")


def logits_only(model):
    """Wrap a causal LM so export sees input_ids, attention_mask -> logits (no KV cache, no dict output)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(model).eval()


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = artifact_path(cfg.model, "model")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model: {model_dir} has no config.json; pass an hf-model directory (save_pretrained output)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    max_len = cfg.max_seq_len or int(model.config.max_position_embeddings)
    vocab = int(model.config.vocab_size)
    ctx.info(f"model {model_dir.name}: {n_params / 1e6:.2f} M params, vocab {vocab}, max_seq_len {max_len}")
    ctx.progress(3, "export")

    # ---- ONNX export: dynamic batch and sequence; the example uses len 8 so 1 is not specialised --
    onnx_dir = ctx.out_dir / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    onnx_path = onnx_dir / "model.onnx"
    wrapped = logits_only(model)
    ex_ids = torch.randint(0, vocab, (2, 8))
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=2, max=max_len)
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress; keep stdout for --json
        if cfg.exporter == "dynamo":
            torch.onnx.export(
                wrapped,
                (ex_ids, torch.ones_like(ex_ids)),
                str(onnx_path),
                dynamo=True,
                opset_version=cfg.opset,
                external_data=False,
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                **names,
            )
        else:
            axes = {"batch": 0, "sequence": 1}
            torch.onnx.export(
                wrapped,
                (ex_ids, torch.ones_like(ex_ids)),
                str(onnx_path),
                dynamo=False,
                opset_version=cfg.opset,
                dynamic_axes={n: {v: k for k, v in axes.items()} for n in ("input_ids", "attention_mask", "logits")},
                **names,
            )
    ctx.log(step=1, stage="onnx export", onnx_bytes=onnx_path.stat().st_size)

    # ---- parity: onnxruntime vs torch on unseen shapes; padded positions are excluded ------------
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(onnx_path))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(cfg.seed)
    worst, checks = 0.0, []
    for i in range(cfg.parity_batches):
        b, s = 1 + i % 3, min(max_len, 5 + 17 * i)
        ids = torch.randint(0, vocab, (b, s), generator=gen)
        mask = torch.ones_like(ids)
        if b > 1:
            mask[-1, : s // 3] = 0  # left padding: the row a batched server would send
        with torch.inference_mode():
            ref = wrapped(ids, mask).numpy()
        got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        valid = mask.numpy().astype(bool)
        diff = float(np.abs(ref - got)[valid].max())
        same_argmax = float((ref.argmax(-1) == got.argmax(-1))[valid].mean())
        checks.append({"shape": [b, s], "max_abs_diff": diff, "argmax_agreement": same_argmax})
        worst = max(worst, diff)
    ctx.log(step=2, stage="parity", max_abs_diff=worst)
    (onnx_dir / "parity.json").write_text(
        json.dumps({"tolerance": cfg.parity_tolerance, "checks": checks}, indent=2) + "\n"
    )
    if worst > cfg.parity_tolerance:
        raise ConfigError(
            f"parity_tolerance: onnxruntime logits differ from torch by {worst:.2e} > {cfg.parity_tolerance:.0e}; "
            f"see {onnx_dir / 'parity.json'}"
        )
    tok.save_pretrained(onnx_dir)  # the tokenizer travels with the graph
    model.config.save_pretrained(onnx_dir)

    # ---- hub-ready folder: safetensors + tokenizer + model card ---------------------------------
    hub = ctx.out_dir / "hub"
    model.save_pretrained(hub, safe_serialization=True)
    tok.save_pretrained(hub)
    for extra in ("generation_config.json",):
        if (model_dir / extra).is_file() and not (hub / extra).exists():
            shutil.copy(model_dir / extra, hub / extra)
    summary = _earlier_summary(model_dir)
    (hub / "README.md").write_text(model_card(cfg, model, n_params, summary, worst))
    ctx.log(step=3, stage="hub folder")

    ctx.summary.update(
        onnx_bytes=onnx_path.stat().st_size,
        onnx_max_abs_diff=worst,
        onnx_argmax_agreement=min(c["argmax_agreement"] for c in checks),
        n_params=n_params,
    )
    ctx.report(
        "\n".join(
            [
                f"# export: {model_dir.name}",
                "",
                (
                    f"- ONNX: `{onnx_path}` ({onnx_path.stat().st_size / 1e6:.2f} MB, {cfg.exporter} exporter, "
                    f"opset {cfg.opset}, dynamic batch × sequence ≤ {max_len})"
                ),
                (
                    f"- parity vs torch (fp32, onnxruntime CPU): max |Δlogit| = {worst:.2e} "
                    f"(tolerance {cfg.parity_tolerance:.0e})"
                ),
                f"- hub folder: `{hub}` (safetensors, tokenizer, README.md model card)",
                "",
                "| shape | max abs diff | argmax agreement |",
                "|---|---:|---:|",
                *[f"| {c['shape']} | {c['max_abs_diff']:.2e} | {c['argmax_agreement']:.3f} |" for c in checks],
            ]
        )
        + "\n"
    )
    return {"onnx": onnx_dir, "model": hub}


def _earlier_summary(model_dir: Path) -> dict:
    """The summary of the run that produced the model (its outputs.json), if it is a Skillbook run dir."""
    for cand in (model_dir.parent / "outputs.json", model_dir / "outputs.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text()).get("summary", {})
            except (OSError, ValueError):
                return {}
    return {}


def model_card(cfg: Config, model, n_params: int, summary: dict, onnx_diff: float) -> str:
    """README.md in the Hugging Face model-card format: YAML metadata, then prose sections."""
    from huggingface_hub import ModelCardData

    c = model.config
    data = ModelCardData(
        language=cfg.language,
        license=cfg.license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["skillbook", c.model_type, "causal-lm"],
        base_model=cfg.base_model,
    )
    metrics = (
        "\n".join(
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in summary.items()
            if isinstance(v, (int, float))
        )
        or "| (none recorded) | |"
    )
    return f"""---
{data.to_yaml()}
---

# {cfg.repo_id.split("/")[-1]}

A {n_params / 1e6:.2f} M-parameter {c.model_type} causal language model built with
[Skillbook](https://github.com/skillbook/skillbook) recipes on its embedded synthetic dataset.
It is a teaching artifact: it knows the facts of a small synthetic village, nothing else.

## Model details

| field | value |
|---|---|
| architecture | {c.architectures[0] if c.architectures else c.model_type} |
| parameters | {n_params:,} |
| layers / hidden / heads | {c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads} |
| context length | {c.max_position_embeddings} |
| vocabulary | {c.vocab_size} (byte-level BPE) |

## How to use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{cfg.repo_id}")
model = AutoModelForCausalLM.from_pretrained("{cfg.repo_id}")
inputs = tok("Question: What colour is Mira's kite?\\nAnswer:", return_tensors="pt")
print(tok.decode(model.generate(**inputs, max_new_tokens=8)[0]))
```

## Evaluation

Metrics recorded by the run that produced this checkpoint:

| metric | value |
|---|---|
{metrics}

An ONNX export of this checkpoint matches the PyTorch logits within {onnx_diff:.1e} (max abs, fp32).

## Limitations

Trained on synthetic text only; it will produce fluent nonsense outside that world. Not for production use.
"""
