"""Quantization: convert an hf-model of any family llama.cpp runs to GGUF at several precisions, prove the file
matches transformers, and measure what each precision costs.

GGUF F32/F16/BF16/Q8_0 are written by llama.cpp's own converter (skillbook.ml.gguf_convert, its
`convert_hf_to_gguf.py` classes); Q4_0 and the K-quants (Q4_K_M, Q5_K_M, Q6_K) by llama.cpp's quantizer
from an F16 file. Before anything loads, the converter must know the architecture and the tokenizer's
pre-tokenizer (its hash table, else tokenizer.json's own definition). After writing: llama.cpp must
tokenize the held-out text exactly as the HF tokenizer does, and the F32 file's logits must match
transformers' (max |Δ| <= 1 % of the largest |logit|). Every GGUF is then measured through
llama-cpp-python: file size, bits per weight, perplexity on the held-out documents (delta vs the
unquantized transformers model) and greedy decode tokens/s. Optional extra rows: PyTorch dynamic int8
(CPU) and bitsandbytes NF4 (CUDA only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from skillbook.errors import ConfigError
from skillbook.ml.data_files import EvalCorpusPath
from skillbook.run.recipe import RecipeConfig, SafeName, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"gguf": "gguf"}
INPUTS = {"model": "hf-model", "corpus": "corpus"}

GGUFType = Literal["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"]
PARITY_TOLERANCE = 0.01  # F32 GGUF vs transformers: max |Δ logit| / max |logit|


class Config(RecipeConfig):
    model: str = Field(
        ...,
        description=(
            "hf-model directory with config.json and tokenizer.json, of any architecture llama.cpp's converter "
            "supports (Llama, Mistral, Qwen2/3, Gemma 2, Phi-3, GPT-2, ...), e.g. the pretraining or sft output."
        ),
    )
    type: GGUFType = Field(
        "Q8_0",
        description=(
            "The GGUF type returned as the `gguf` output. Q8_0: ~8.5 bits/weight, near-lossless; Q4_K_M: ~4.8 bits, "
            "the usual laptop choice."
        ),
    )
    types: list[GGUFType] = Field(
        default_factory=lambda: list[GGUFType](["F32", "F16", "Q8_0", "Q4_K_M"]),
        description="Further GGUF types to write and measure in the same run (the report compares them all).",
    )
    corpus: EvalCorpusPath | None = Field(
        None,
        description=(
            "Held-out perplexity text: a .jsonl/.json/.parquet file of {text} rows or a .txt file (every document), "
            "or a corpus folder (its val.jsonl); None = the embedded synthetic world (the summary's perplexity_data "
            "says which)."
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
    check_f32: bool = Field(
        True,
        description=(
            "Compare an F32 GGUF's logits with transformers on 4 held-out docs (written temporarily when F32 is "
            "not in types: 4 bytes per parameter of disk). Token-id equality is always checked."
        ),
    )
    name: SafeName | None = Field(
        None,
        description=(
            "general.name written into the GGUF metadata and the GGUF file stem (letters, digits, . _ + -); "
            "None = the model folder's name."
        ),
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
    """First `eval_docs` held-out documents (a corpus file, or a corpus folder's val split), tokenized with BOS
    and cut to the context; the log and the summary say where they came from."""
    from skillbook.ml.data_files import load_held_out, read_texts

    if cfg.corpus is None:
        from skillbook.ml.synthetic import write_default_data

        corpus = write_default_data(ctx.out_dir / "data", seed=cfg.seed)["corpus"]
        texts, source = read_texts(corpus / "val.jsonl"), "embedded synthetic world"
        ctx.info("no corpus given: perplexity is on the embedded synthetic world, not your data (set corpus=FILE)")
    else:
        got = load_held_out(cfg.corpus, "corpus", None)
        texts, source = got.held, got.held_source
    texts = texts[: cfg.eval_docs]
    ctx.info(f"corpus: perplexity on {len(texts)} documents of {source}")
    ctx.summary["perplexity_data"] = source
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [(bos + tok(t, add_special_tokens=False)["input_ids"])[:n_ctx] for t in texts]


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml import gguf_convert as gc
    from skillbook.ml import gguf_export as gx
    from skillbook.ml.model_files import check_hf_dir

    model_dir = artifact_path(cfg.model, "model")
    if not (model_dir / "config.json").is_file() or not (model_dir / "tokenizer.json").is_file():
        raise ConfigError(
            f"model: {model_dir} needs config.json and tokenizer.json (an hf-model dir with its tokenizer)"
        )
    check_hf_dir(model_dir)  # a known model_type and readable safetensors, before the converter starts
    if cfg.bnb_4bit and not torch.cuda.is_available():
        raise ConfigError("bnb_4bit: bitsandbytes 4-bit needs a CUDA GPU; set bnb_4bit=false on CPU")

    # ---- GGUF files: llama.cpp's converter writes every type in one run -------------------------
    # It refuses an architecture or pre-tokenizer it cannot reproduce before writing or loading anything.
    order = [t for t in gx.ALL_TYPES if t in cfg.types]
    gguf_dir = ctx.out_dir / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    stem = cfg.name or model_dir.name
    paths: dict[str, Path] = {t: gguf_dir / f"{stem}-{t}.gguf" for t in order}
    f32 = paths.get("F32") or (gguf_dir / f".{stem}-F32-parity.gguf" if cfg.check_f32 else None)
    plan = gc.convert_many(model_dir, paths | ({"F32": f32} if f32 else {}), name=cfg.name)[cfg.type]
    ctx.info(
        f"llama.cpp converter: {plan['architecture']}, pre-tokenizer {plan['pre_tokenizer']!r} "
        f"({plan['pre_tokenizer_source']}); wrote {', '.join(order)}"
        + (f"; {plan['name_note']}" if plan["name_note"] else "")
    )
    torch.set_num_threads(cfg.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_ctx = int(getattr(model.config, "max_position_embeddings", None) or model.config.n_positions)
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

    # ---- the GGUF must tokenize as HF does and (F32) compute the same logits; then measure each ----
    try:
        fidelity = _fidelity(model, tok, docs, paths[cfg.type], f32, n_ctx, cfg.threads)
    finally:
        if f32 is not None and "F32" not in paths:
            f32.unlink(missing_ok=True)
    ctx.info(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fidelity.items()))
    ctx.progress(len(order), "measure")
    for i, qtype in enumerate(order, 1):
        path = paths[qtype]
        types = gx.gguf_tensor_types(path)
        if qtype.startswith("Q") and "_K" in qtype and not any("_K" in t for t in types):
            ctx.info(f"{qtype}: no row width is a multiple of 256, so llama.cpp fell back to {types}")
        llm = gx.load_gguf(path, n_ctx=n_ctx, threads=cfg.threads, logits_all=True)
        ppl = gx.gguf_perplexity(llm, docs)
        speed = gx.gguf_decode_speed(llm, prompt, new_tokens)
        del llm
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
    row_keys = ("size_bytes", "bits_per_weight", "perplexity", "ppl_delta", "decode_tokens_per_s", "speedup_vs_fp32")
    ctx.summary.update(
        type=cfg.type,
        architecture=plan["architecture"],
        pre_tokenizer=plan["pre_tokenizer"],
        **{k: round(v, 8) if isinstance(v, float) else v for k, v in fidelity.items()},
        gguf_size_bytes=main["size_bytes"],
        bits_per_weight=round(main["bits_per_weight"], 3),
        perplexity=round(main["perplexity"], 4),
        base_perplexity=round(base_ppl, 4),
        ppl_delta=round(main["ppl_delta"], 4),
        decode_tokens_per_s=round(main["decode_tokens_per_s"], 1),
        speedup_vs_fp32=round(main["speedup_vs_fp32"], 2),
        formats={r["name"]: {k: r[k] for k in row_keys} for r in rows},  # SKILL.md's measured table reads these
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


def _fidelity(model, tok, docs: list[list[int]], main: Path, f32: Path | None, n_ctx: int, threads: int) -> dict:
    """llama.cpp must tokenize the held-out text as the HF tokenizer does, and the F32 file compute its logits."""
    from skillbook.ml import gguf_export as gx
    from skillbook.ml.gguf_convert import ConversionMismatch

    texts = [tok.decode(ids, skip_special_tokens=True) for ids in docs]  # the documents' text, as scored
    llm = gx.load_gguf(main, n_ctx=n_ctx, threads=threads)
    bad = gx.token_mismatches(llm, tok, texts)
    del llm
    if bad:
        raise ConversionMismatch(
            f"llama.cpp tokenizes {len(bad)} of {len(texts)} held-out documents differently from the HF tokenizer "
            f"(first: {bad[0][:80]!r}); the GGUF would see other token ids than the model was trained on"
        )
    out: dict = {"tokenization_equal_docs": len(texts)}
    if f32 is not None:
        llm = gx.load_gguf(f32, n_ctx=n_ctx, threads=threads, logits_all=True, kv_f32=True)
        out["f32_logit_rel_diff"] = rel = gx.logit_parity(llm, model, docs[:4])
        del llm
        if rel > PARITY_TOLERANCE:
            raise ConversionMismatch(
                f"the F32 GGUF's logits differ from transformers' by {rel:.2%} of the largest logit (allowed "
                f"{PARITY_TOLERANCE:.0%}): llama.cpp runs this {type(model).__name__} differently"
            )
    return out


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
