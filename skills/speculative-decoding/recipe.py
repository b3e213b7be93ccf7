"""Speculative decoding: a small draft proposes tokens, the target verifies them in one forward pass.

transformers' assisted generation (`generate(assistant_model=draft)`) and prompt-lookup decoding
(`prompt_lookup_num_tokens`, candidates copied from the context), and llama.cpp's prompt lookup on a GGUF
(llama-cpp-python's `LlamaPromptLookupDecoding`). Greedy decoding on held-out prompts: tokens/s of each
method against the target alone in the same run, the acceptance rate (accepted / proposed draft tokens,
counted from the target's verification passes by skillbook.ml.speculative) and whether the output is
token-for-token the target's own. Without `model`/`draft` it trains both with the pretraining skill.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from skillbook.errors import ConfigError
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"report": "report"}
INPUTS = {"model": "hf-model", "draft": "hf-model", "corpus": "corpus"}


class Config(RecipeConfig):
    """The defaults are the CPU-tiny run: target = the pretraining default (0.98M, 4 x 128), draft = 1 x 64
    (0.12M), both trained on the embedded world with one tokenizer; 6 held-out prompts x 40 greedy tokens."""

    model: str | None = Field(None, description="Target hf-model dir or hub id; None = train it with pretraining.")
    draft: str | None = Field(
        None,
        description="Draft hf-model on the target's tokenizer (same vocabulary and ids); None = train one with "
        "pretraining on the target's tokenizer.",
    )
    corpus: str | None = Field(
        None, description="Corpus dir: training data if models are trained, val.jsonl openings are the prompts."
    )
    target_train: dict[str, Any] = Field(
        default_factory=dict,
        description="pretraining overrides for a trained target (e.g. {n_layer: 8, max_steps: 300}); {} = the "
        "pretraining skill's CPU-tiny default (4 x 128, 300 steps).",
    )
    draft_layers: int = Field(
        1, ge=1, description="Decoder blocks of a trained draft (a quarter of the target's or less)."
    )
    draft_width: int = Field(64, ge=16, description="Hidden size of a trained draft (64-wide heads).")
    draft_steps: int = Field(200, ge=1, description="Pretraining steps of a trained draft (~0.12M params: ~15 s).")
    num_assistant_tokens: int = Field(
        5, ge=1, le=64, description="Draft tokens proposed per round (constant schedule); 3-8 is the usual range."
    )
    confidence: float = Field(
        0.4,
        ge=0,
        le=1,
        description="Stop a draft round early when the draft's top probability falls below this "
        "(transformers' assistant_confidence_threshold; 0 = always propose num_assistant_tokens).",
    )
    lookup_tokens: int = Field(
        3, ge=1, le=64, description="Prompt-lookup candidates per step (2-3 on CPU, ~10 on GPUs)."
    )
    lookup_ngram: int = Field(
        2, ge=1, le=8, description="Longest n-gram matched against the context for lookup (both engines)."
    )
    llama_cpp: bool = Field(True, description="Also time llama.cpp with and without prompt lookup (Llama targets).")
    prompts: int = Field(6, ge=1, description="Held-out prompts: openings of the first N val.jsonl documents.")
    prompt_tokens: int = Field(24, ge=2, description="Tokens per prompt (BOS + the document's first tokens).")
    new_tokens: int = Field(40, ge=2, description="Greedy tokens generated per prompt (EOS ignored).")
    rounds: int = Field(3, ge=1, description="Interleaved timing rounds; tokens/s is the median over rounds.")
    threads: int = Field(1, ge=1, description="CPU threads (1 for tiny models: their ops are too small to split).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when a GPU is visible.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto = bf16 on bf16 GPUs for 5M+ params, else fp32."
    )
    seed: int = Field(0, description="Seed for the default data and trained models.")


# ---------------------------------------------------------------------------------------------
# Inputs: the target and the draft (trained when not given), the held-out prompts
# ---------------------------------------------------------------------------------------------


def pretrain(ctx: RunContext, role: str, sets: dict) -> Path:
    """Train a model with the pretraining skill and move its run to run_dir/<role>/ (the next call reuses
    run_dir/pretraining/); returns the model dir."""
    res = ctx.run_skill("pretraining", sets)
    src, dest = ctx.out_dir / "pretraining", ctx.out_dir / role
    model = Path(res["outputs"]["model"]["path"]).relative_to(src)
    shutil.rmtree(dest, ignore_errors=True)
    src.rename(dest)
    ctx.info(f"trained the {role} ({res['summary']['params'] / 1e6:.2f}M params) into {dest}")
    return dest / model


def held_out_prompts(corpus: Path, tok, cfg: Config) -> list[list[int]]:
    val = corpus / "val.jsonl"
    if not val.is_file():
        raise ConfigError(f"corpus: {val} is missing; pass a corpus directory with train.jsonl and val.jsonl")
    texts = [json.loads(line)["text"] for line in val.read_text().splitlines() if line.strip()][: cfg.prompts]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [(bos + tok(t, add_special_tokens=False)["input_ids"])[: cfg.prompt_tokens] for t in texts]


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    from skillbook.ml.hf_models import resolve_model
    from skillbook.ml.tokenizer_utils import tokenizer_mismatch

    # ---- fail fast: given models resolve and share one tokenizer, before anything trains or loads -----
    model = resolve_model(cfg.model, "model") if cfg.model else None
    draft = resolve_model(cfg.draft, "draft") if cfg.draft else None
    if model and draft and (why := tokenizer_mismatch(model, draft)):
        raise ConfigError(
            f"draft: its tokenizer differs from the target's ({why}); draft={draft} cannot propose tokens for "
            f"model={model}: pass a draft trained on the target's tokenizer, or omit draft to train one"
        )
    if model and not draft and not Path(model).is_dir():
        raise ConfigError(
            f"draft: training a draft needs the target's tokenizer on disk, and model={model} is a hub id; "
            f"pass draft= (e.g. meta-llama/Llama-3.2-1B for a Llama-3.1 target) or a local model dir"
        )
    if cfg.corpus:
        corpus = artifact_path(cfg.corpus, "corpus")
    else:
        from skillbook.ml.synthetic import write_default_data

        corpus = write_default_data(ctx.out_dir / "data", seed=cfg.seed)["corpus"]

    # ---- train what is missing: the draft always on the target's tokenizer (or the target on the draft's)
    ctx.setup_device(cfg.device)
    base = {"corpus": str(corpus), "seed": cfg.seed}
    if model is None:
        model = str(pretrain(ctx, "target", {**base, "tokenizer": draft, **cfg.target_train}))
    if draft is None:
        shape = {"n_layer": cfg.draft_layers, "d_model": cfg.draft_width, "n_head": max(1, cfg.draft_width // 64)}
        draft = str(pretrain(ctx, "draft", {**base, "tokenizer": model, **shape, "max_steps": cfg.draft_steps}))
    return measure(cfg, ctx, model, draft, Path(corpus))


def measure(cfg: Config, ctx: RunContext, model: str, draft: str, corpus: Path) -> dict[str, Path]:
    """Time every method on the held-out prompts, interleaved; report acceptance, speed and identity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml import speculative as sp

    # ---- load both; the draft's rounds have a fixed length so every prompt is measured alike --------
    torch.set_num_threads(cfg.threads)
    tok = AutoTokenizer.from_pretrained(model)
    target = AutoModelForCausalLM.from_pretrained(model).eval()
    n_params = sum(p.numel() for p in target.parameters())
    dtype = getattr(torch, ctx.choose_dtype(cfg.dtype, n_params).dtype)
    device = ctx.device or "cpu"
    target = target.to(device, dtype)
    assistant = AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).eval()
    assistant.to(device)
    sp.configure_draft(assistant, cfg.num_assistant_tokens, cfg.confidence)
    prompts = held_out_prompts(corpus, tok, cfg)
    n_ctx = int(getattr(target.config, "max_position_embeddings", 0) or 2048)
    new = min(cfg.new_tokens, n_ctx - max(map(len, prompts)) - 1)
    if new < 2:
        raise ConfigError(f"prompt_tokens: {cfg.prompt_tokens} leaves no room in the target's {n_ctx}-token context")
    d_params = sum(p.numel() for p in assistant.parameters())
    ctx.info(
        f"target {n_params / 1e6:.2f}M, draft {d_params / 1e6:.2f}M params; {len(prompts)} held-out prompts x "
        f"{new} greedy tokens, {cfg.rounds} rounds, {cfg.threads} threads, {device} {dtype}"
    )

    # ---- the methods, each one call per prompt; llama.cpp on a GGUF of the target when it is a Llama ------
    methods: dict[str, Callable[[list[int]], sp.Decode]] = {
        "target alone": lambda p: sp.generate(target, p, new),
        "target + draft (assisted)": lambda p: sp.generate(target, p, new, draft=assistant),
        "target + prompt lookup": lambda p: sp.generate(
            target, p, new, lookup=cfg.lookup_tokens, ngram=cfg.lookup_ngram
        ),
        "draft alone": lambda p: sp.generate(assistant, p, new),
    }
    if cfg.llama_cpp and target.config.model_type == "llama" and Path(model).is_dir():
        from skillbook.ml.gguf_export import write_gguf

        gguf = ctx.out_dir / "target-F16.gguf"
        write_gguf(Path(model), gguf, "F16")
        plain = sp.load_gguf_lookup(gguf, n_ctx, cfg.threads, None)
        lookup = sp.load_gguf_lookup(gguf, n_ctx, cfg.threads, cfg.lookup_tokens, cfg.lookup_ngram)
        methods["llama.cpp alone"] = lambda p: sp.gguf_generate(plain, p, new)
        methods["llama.cpp + prompt lookup"] = lambda p: sp.gguf_generate(lookup, p, new)
    elif cfg.llama_cpp:
        ctx.info(f"llama.cpp rows skipped: the GGUF writer takes local Llama models, not {target.config.model_type}")

    # ---- measure: interleaved rounds (a shared CPU drifts), outputs and counts from the first ----------
    for fn in methods.values():
        fn(prompts[0][:4])  # warm-up: first-call allocations are not decoding speed
    speeds: dict[str, list[float]] = {m: [] for m in methods}
    first: dict[str, list] = {}
    ctx.progress(cfg.rounds, "speculative decoding")
    for r in range(cfg.rounds):
        for name, fn in methods.items():
            runs = [fn(p) for p in prompts]
            speeds[name].append(sum(len(d.tokens) for d in runs) / sum(d.seconds for d in runs))
            first.setdefault(name, runs)
        ctx.log(step=r + 1, **{f"tokens_per_s/{m}": round(v[-1], 1) for m, v in speeds.items()})

    rows = tabulate(first, speeds)
    return write_results(cfg, ctx, rows, n_params, d_params, new, len(prompts))


def tabulate(first: dict[str, list], speeds: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One row per method: median tokens/s, acceptance and tokens per target pass (from the first round),
    identity with and speed over the same engine's target alone."""
    rows: list[dict[str, Any]] = []
    for name, runs in first.items():
        ref = first["llama.cpp alone" if name.startswith("llama.cpp") else "target alone"]
        proposed = sum(d.proposed for d in runs)
        rows.append(
            {
                "method": name,
                "tokens_per_s": statistics.median(speeds[name]),
                "tokens_per_s_rounds": [round(s, 1) for s in speeds[name]],
                "acceptance_rate": sum(d.accepted for d in runs) / proposed if proposed else None,
                "proposed": proposed,
                "tokens_per_pass": sum(len(d.tokens) for d in runs) / sum(d.passes for d in runs),
                "identical": None if name == "draft alone" else [d.tokens for d in runs] == [d.tokens for d in ref],
            }
        )
    for row in rows:
        ref_name = "llama.cpp alone" if row["method"].startswith("llama.cpp") else "target alone"
        row["speedup"] = row["tokens_per_s"] / next(x["tokens_per_s"] for x in rows if x["method"] == ref_name)
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def write_results(cfg: Config, ctx: RunContext, rows: list[dict], n_params: int, d_params: int, new: int, n: int):
    by = {r["method"]: r for r in rows}
    spec, look = by["target + draft (assisted)"], by["target + prompt lookup"]
    ctx.summary.update(
        target_params=n_params,
        draft_params=d_params,
        acceptance_rate=round(spec["acceptance_rate"] or 0.0, 4),
        lookup_acceptance_rate=round(look["acceptance_rate"] or 0.0, 4),
        target_tokens_per_s=round(by["target alone"]["tokens_per_s"], 1),
        assisted_tokens_per_s=round(spec["tokens_per_s"], 1),
        lookup_tokens_per_s=round(look["tokens_per_s"], 1),
        assisted_speedup=round(spec["speedup"], 3),
        lookup_speedup=round(look["speedup"], 3),
        tokens_per_pass=round(spec["tokens_per_pass"], 3),
        identical=all(r["identical"] is not False for r in rows),
    )
    if "llama.cpp + prompt lookup" in by:
        ctx.summary.update(llama_cpp_lookup_speedup=round(by["llama.cpp + prompt lookup"]["speedup"], 3))
    (ctx.out_dir / "speculative.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# speculative decoding",
        "",
        f"Target {n_params / 1e6:.2f}M, draft {d_params / 1e6:.2f}M params; greedy, {n} held-out prompts x {new} "
        f"tokens, {cfg.threads} threads; draft rounds of up to {cfg.num_assistant_tokens} tokens (confidence "
        f"{cfg.confidence}), lookup {cfg.lookup_tokens} tokens. Acceptance = accepted / proposed, counted from "
        "the target's verification passes; x = tokens/s over the same engine's target alone (median of "
        f"{cfg.rounds} interleaved rounds).",
        "",
        "| method | tokens/s | x target alone | acceptance | tokens per target pass | identical to target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
        same = {True: "yes", False: "NO", None: "-"}[r["identical"]]
        lines.append(
            f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f} | {acc} | "
            f"{r['tokens_per_pass']:.2f} | {same} |"
        )
    verdict = "faster" if spec["speedup"] > 1 else "slower"
    lines += [
        "",
        f"Assisted generation is {verdict} than the target alone here ({spec['speedup']:.2f}x): it accepts "
        f"{spec['acceptance_rate'] or 0:.0%} of the draft's tokens and makes {spec['tokens_per_pass']:.2f} tokens "
        f"per target pass, but each round also pays the draft's own generate() call. Prompt lookup: "
        f"{look['speedup']:.2f}x at {look['acceptance_rate'] or 0:.0%} acceptance.",
    ]
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[4:]))
    report = ctx.out_dir / "report.md"
    return {"report": report}
