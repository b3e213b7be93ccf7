"""Quantization: convert an hf-model (Llama) to GGUF at several precisions and measure what each costs.

GGUF F32/F16/Q8_0/Q4_0 are written by the `gguf` package (skillbook.ml.gguf_export); K-quants
(Q4_K_M, Q5_K_M, Q6_K) by llama.cpp's own quantizer from the F16 file. Every GGUF is measured
through llama-cpp-python: file size, bits per weight, perplexity on the held-out corpus split
(delta vs the unquantized transformers model) and greedy decode tokens/s. Optional extra rows:
PyTorch dynamic int8 (CPU) and bitsandbytes NF4 (CUDA only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from skillbook.errors import ConfigError
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"gguf": "gguf"}
INPUTS = {"model": "hf-model", "corpus": "corpus"}

GGUFType = Literal["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]


class Config(RecipeConfig):
    model: str = Field(
        ...,
        description="hf-model directory (Llama architecture, tokenizer inside), e.g. the pretraining or sft output.",
    )
    type: GGUFType = Field(
        "Q8_0",
        description=(
            "The GGUF type returned as the `gguf` output. Q8_0: ~8.5 bits/weight, near-lossless; Q4_K_M: ~4.8 bits, "
            "the usual laptop choice."
        ),
    )
    types: list[GGUFType] = Field(
        default_factory=lambda: ["F32", "F16", "Q8_0", "Q4_K_M"],
        description="Further GGUF types to write and measure in the same run (the report compares them all).",
    )
    corpus: str | None = Field(
        None,
        description=(
            "Corpus directory whose val.jsonl is the held-out perplexity set; None = the embedded synthetic world."
        ),
    )
    eval_docs: int = Field(
        24,
        ge=1,
        description="How many val.jsonl documents the perplexity is computed on (all runs use the same token ids).",
    )
    decode_tokens: int = Field(
        96, ge=2, description="New tokens generated per decode-speed measurement (greedy, prefill excluded)."
    )
    threads: int = Field(
        1,
        ge=1,
        description=(
            "CPU threads for llama.cpp and torch; pass it explicitly (llama.cpp defaults to half the cores). "
            "1 for tiny models, whose ops are too small to split; physical cores for real ones."
        ),
    )
    torch_int8: bool = Field(
        True, description="Also measure PyTorch dynamic int8 (torch.ao quantize_dynamic on nn.Linear, CPU inference)."
    )
    bnb_4bit: bool = Field(
        False,
        description=(
            "Also load the model in bitsandbytes NF4 4-bit and measure it (needs a CUDA GPU and the `gpu` extra)."
        ),
    )
    name: str | None = Field(
        None, description="general.name written into the GGUF metadata; None = the model folder's name."
    )
    seed: int = Field(0, description="Seed for the default data.")

    @model_validator(mode="after")
    def _type_listed(self) -> Config:
        if self.type not in self.types:  # the returned file is always measured
            self.types = [*self.types, self.type]
        return self


# ---------------------------------------------------------------------------------------------
# Inputs: the model, the held-out documents and one decode prompt, all as token ids
# ---------------------------------------------------------------------------------------------


def held_out_docs(cfg: Config, ctx: RunContext, tok, n_ctx: int) -> list[list[int]]:
    """First `eval_docs` val.jsonl documents, tokenized with BOS and cut to the context."""
    if cfg.corpus is None:
        from skillbook.ml.synthetic import write_default_data

        corpus = write_default_data(ctx.out_dir / "data", seed=cfg.seed)["corpus"]
    else:
        corpus = artifact_path(cfg.corpus, "corpus")
    val = Path(corpus) / "val.jsonl"
    if not val.is_file():
        raise ConfigError(f"corpus: {val} is missing; pass a corpus directory with train.jsonl and val.jsonl")
    texts = [json.loads(line)["text"] for line in val.read_text().splitlines() if line.strip()][: cfg.eval_docs]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [(bos + tok(t, add_special_tokens=False)["input_ids"])[:n_ctx] for t in texts]


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml import gguf_export as gx

    model_dir = artifact_path(cfg.model, "model")
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.json").is_file():
        raise ConfigError(
            f"model: {model_dir} needs config.json and tokenizer.json (an hf-model dir with its tokenizer)"
        )
    arch = AutoConfig.from_pretrained(model_dir).model_type
    if arch != "llama":
        raise ConfigError(f"model: architecture {arch!r} is not supported; the GGUF writer handles Llama models")
    if cfg.bnb_4bit and not torch.cuda.is_available():
        raise ConfigError("bnb_4bit: bitsandbytes 4-bit needs a CUDA GPU; set bnb_4bit=false on CPU")
    torch.set_num_threads(cfg.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_ctx = int(model.config.max_position_embeddings)
    docs = held_out_docs(cfg, ctx, tok, n_ctx)
    prompt = docs[0][: max(2, min(16, n_ctx - cfg.decode_tokens - 1))]
    new_tokens = min(cfg.decode_tokens, n_ctx - len(prompt) - 1)
    ctx.info(
        f"model {model_dir.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
        f"context {n_ctx}; perplexity on {len(docs)} held-out docs ({sum(map(len, docs))} tokens)"
    )

    # ---- baseline: the unquantized model in transformers (fp32) -------------------------------
    rows = []
    base_ppl = gx.torch_perplexity(model, docs)
    # parameters() counts a tied embedding/lm_head once, as the GGUF stores it
    rows.append(
        {
            "name": "transformers fp32",
            "size_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "bits_per_weight": 32.0,
            "perplexity": base_ppl,
            "decode_tokens_per_s": gx.torch_decode_speed(model, prompt, new_tokens),
        }
    )
    ctx.info(f"fp32 baseline: perplexity {base_ppl:.4f}, decode {rows[0]['decode_tokens_per_s']:.0f} tok/s")

    # ---- GGUF files: direct types first, K-quants from the F16 file ----------------------------
    order = [t for t in ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K") if t in cfg.types]
    gguf_dir = ctx.out_dir / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    stem = cfg.name or model_dir.name
    paths: dict[str, Path] = {}
    ctx.progress(len(order), "quantize + measure")
    for i, qtype in enumerate(order, 1):
        path = gguf_dir / f"{stem}-{qtype}.gguf"
        if qtype in gx.LLAMA_CPP_TYPES:
            f16 = gguf_dir / f"{stem}-F16.gguf"
            if not f16.exists():  # K-quants are made from F16, as llama.cpp's llama-quantize does
                gx.write_gguf(model_dir, f16, "F16", name=stem)
            gx.quantize_gguf(f16, path, qtype, threads=cfg.threads)
            if "F16" not in cfg.types:
                f16.unlink()
        else:
            gx.write_gguf(model_dir, path, qtype, name=stem)
        types = gx.gguf_tensor_types(path)
        if qtype.startswith("Q") and "_K" in qtype and not any("_K" in t for t in types):
            ctx.info(f"{qtype}: no row width is a multiple of 256, so llama.cpp fell back to {types}")
        llm = gx.load_gguf(path, n_ctx=n_ctx, threads=cfg.threads, logits_all=True)
        ppl = gx.gguf_perplexity(llm, docs)
        speed = gx.gguf_decode_speed(llm, prompt, new_tokens)
        del llm
        paths[qtype] = path
        rows.append(
            {
                "name": f"GGUF {qtype}",
                "size_bytes": path.stat().st_size,
                "bits_per_weight": gx.gguf_bits_per_weight(path),
                "perplexity": ppl,
                "decode_tokens_per_s": speed,
                "tensor_types": types,
            }
        )
        ctx.log(step=i, type=qtype, perplexity=ppl, decode_tokens_per_s=speed)

    # ---- PyTorch dynamic int8: Linear weights int8, activations quantized on the fly (CPU) ------
    if cfg.torch_int8:
        import io
        import warnings

        with warnings.catch_warnings():  # deprecated in favour of torchao, still the zero-dependency CPU path
            warnings.simplefilter("ignore")
            qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        buf = io.BytesIO()
        torch.save(qmodel.state_dict(), buf)
        n_params = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "name": "torch dynamic int8",
                "size_bytes": buf.tell(),
                "bits_per_weight": 8 * buf.tell() / n_params,
                "perplexity": gx.torch_perplexity(qmodel, docs),
                "decode_tokens_per_s": gx.torch_decode_speed(qmodel, prompt, new_tokens),
            }
        )

    # ---- bitsandbytes NF4 (GPU only): the QLoRA storage format --------------------------------
    if cfg.bnb_4bit:
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        qmodel = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map={"": 0})
        rows.append(
            {
                "name": "bitsandbytes nf4",
                "size_bytes": qmodel.get_memory_footprint(),
                "bits_per_weight": 8 * qmodel.get_memory_footprint() / sum(p.numel() for p in model.parameters()),
                "perplexity": _cuda_perplexity(qmodel, docs),
                "decode_tokens_per_s": None,
            }
        )

    # ---- report -------------------------------------------------------------------------------
    for r in rows:
        r["ppl_delta"] = r["perplexity"] - base_ppl
        r["speedup_vs_fp32"] = (r["decode_tokens_per_s"] or 0) / rows[0]["decode_tokens_per_s"]
    (ctx.out_dir / "quantization.json").write_text(json.dumps(rows, indent=2) + "\n")
    main = next(r for r in rows if r["name"] == f"GGUF {cfg.type}")
    ctx.summary.update(
        type=cfg.type,
        gguf_size_bytes=main["size_bytes"],
        bits_per_weight=round(main["bits_per_weight"], 3),
        perplexity=round(main["perplexity"], 4),
        base_perplexity=round(base_ppl, 4),
        ppl_delta=round(main["ppl_delta"], 4),
        decode_tokens_per_s=round(main["decode_tokens_per_s"], 1),
        speedup_vs_fp32=round(main["speedup_vs_fp32"], 2),
    )
    lines = [
        f"# quantization: {model_dir.name}",
        "",
        (
            f"Perplexity on {len(docs)} held-out documents; "
            f"decode = greedy, {new_tokens} new tokens, {cfg.threads} threads."
        ),
        "",
        "| format | file size | bits/weight | perplexity | Δ ppl | decode tok/s | × fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tps = f"{r['decode_tokens_per_s']:.0f}" if r["decode_tokens_per_s"] else "n/a"
        lines.append(
            f"| {r['name']} | {r['size_bytes'] / 1e6:.2f} MB | {r['bits_per_weight']:.2f} | {r['perplexity']:.4f} | "
            f"{r['ppl_delta']:+.4f} | {tps} | {r['speedup_vs_fp32']:.1f} |"
        )
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[4:]))
    return {"gguf": paths[cfg.type]}


def _cuda_perplexity(model, docs: list[list[int]]) -> float:
    """Perplexity of a model that lives on the GPU (bitsandbytes)."""
    import math

    import torch

    nll, n = 0.0, 0
    with torch.inference_mode():
        for ids in docs:
            x = torch.tensor([ids], device=model.device)
            out = model(x, labels=x)
            nll += out.loss.item() * (len(ids) - 1)
            n += len(ids) - 1
    return math.exp(nll / n)
