"""Long context: run a model at 2x and 4x the context it was trained at, by RoPE scaling (linear position
interpolation, dynamic NTK, YaRN) with and without a short fine-tune at the longer length.

Story: check the model has rotary positions -> the base model (trained with the pretraining skill when not
given) -> teach it the passkey task at its own context (a few hundred steps, so that every length asks the
same question of a model that can answer it) -> for every method: the base's weights in a scaled config,
measured as is, then fine-tuned at the longest length on corpus windows mixed with passkey documents, measured
again -> perplexity on held-out windows and passkey accuracy at 1x, 2x and 4x of the trained context ->
the fine-tuned model of `keep` saved as an hf-model, report.md. The scaling itself is transformers'
`rope_parameters`; the fine-tune is a plain torch loop (nanoGPT style) over two data sources.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from skillbook.ml.data_files import CorpusPath, corpus_sources
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "hf-model", "base_model": "hf-model", "report": "report"}
INPUTS = {"model": "hf-model", "corpus": "corpus"}
Method = Literal["none", "linear", "dynamic", "yarn"]


class Config(RecipeConfig):
    """The defaults are the CPU-tiny run: the pretraining default (0.98M, context 128, trained here), taught
    the passkey task at 128 tokens, then every method measured at 128/256/512 and fine-tuned at 512, ~2 min."""

    model: str | None = Field(
        None, description="A rotary-position hf-model dir or hub id; None = train the pretraining default on corpus."
    )
    model_train: dict[str, Any] = Field(
        default_factory=dict, description="pretraining overrides for a trained model (e.g. {max_steps: 600})."
    )
    corpus: CorpusPath | None = Field(
        None, description="Filler and perplexity text (folder with train/val, or one file); None = the embedded world."
    )
    val_fraction: float = Field(0.05, gt=0, le=0.5, description="Held-out share of a single corpus file.")
    factor: float = Field(4.0, gt=1, description="Target context / trained context (the longest length measured).")
    methods: list[Method] = Field(
        ["none", "linear", "dynamic", "yarn"], min_length=1, description="Methods to compare (none = RoPE as trained)."
    )
    yarn_beta_fast: float | None = Field(
        None,
        gt=1,
        description="YaRN's beta_fast (turns over the trained context above which a rotary pair is not "
        "interpolated); None = 32, or context/16 below 512 tokens so pairs under 16 tokens stay as trained.",
    )
    keep: Method = Field("yarn", description="Whose fine-tuned model is the `model` output (one of methods).")
    save_all: bool = Field(False, description="Also save every other method's fine-tuned model (finetuned/<method>/).")
    task_steps: int = Field(
        600,
        ge=0,
        description="Steps teaching the passkey task at the trained context, on the same passkey/corpus mix "
        "(0 for a model that has it).",
    )
    finetune_steps: int = Field(60, ge=0, description="Fine-tune steps at factor x the context, per method (0 = skip).")
    batch_size: int = Field(8, ge=1, description="Sequences per step (at the task and at the fine-tune length).")
    passkey_share: float = Field(
        0.75, ge=0, le=1, description="Share of every training batch that is passkey documents (the rest: corpus)."
    )
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate of the task stage (constant after warmup).")
    finetune_lr: float = Field(
        5e-4, gt=0, description="AdamW learning rate of the fine-tune at the long length (2e-5 for real 1B+ models)."
    )
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps of each training stage.")
    eval_windows: int = Field(8, ge=1, description="Held-out windows per length for perplexity.")
    passkey_trials: int = Field(24, ge=1, description="Passkey prompts per length.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when a GPU is visible.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Autocast dtype; auto = bf16 on bf16 GPUs (and native-bf16 CPUs from 5M params)."
    )
    seed: int = Field(0, description="Seed: passkeys, depths, filler and batch order.")

    @model_validator(mode="after")
    def _keep_is_measured(self) -> Config:
        if self.keep not in self.methods:
            raise ValueError(f"keep: {self.keep!r} is not in methods {self.methods}; add it or keep one of them")
        return self


def train(
    model: Any, cfg: Config, ctx: RunContext, sources: dict, length: int, steps: int, lr: float, name: str
) -> list[float]:
    """`steps` AdamW steps on `length`-token rows: passkey documents (loss on the answer only: retrieval)
    and, for the share that is not passkeys, corpus windows (loss on every token: language modelling).
    The two losses are added, so a few answer tokens are not drowned by thousands of window tokens."""
    import torch

    from skillbook.ml import lm_data
    from skillbook.ml.training import optim, precision

    n_key = round(cfg.batch_size * cfg.passkey_share)  # the rest keeps the model a language model
    sampler = lm_data.WindowSampler(sources["train"], length, cfg.seed)
    opt = optim.adamw(model, lr, 0.0, (0.9, 0.95))
    model.train()
    losses: list[float] = []
    ctx.progress(steps, name)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        parts = [sources["passkeys"].batch(n_key, length)] if n_key else []
        if cfg.batch_size - n_key:
            parts.append(sampler.windows(sampler.take(cfg.batch_size - n_key)))
        x, y = (torch.cat(t).to(ctx.device) for t in zip(*parts, strict=True))
        with precision.autocast(ctx.device, ctx.dtype):
            logits = model(input_ids=x).logits.float()
        ce = torch.nn.functional.cross_entropy  # ignores the -100 labels of the passkey rows
        loss = torch.zeros((), device=x.device)
        if n_key:  # retrieval: the answers of the passkey rows
            loss = loss + ce(logits[:n_key].flatten(0, 1), y[:n_key].flatten())
        if n_key < len(x):  # language modelling: every token of the corpus windows
            loss = loss + ce(logits[n_key:].flatten(0, 1), y[n_key:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ctx.log(step=step + 1, **{f"{name}/loss": losses[-1]})
    return losses


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    """Check, get the base model, teach the task, then measure and fine-tune every method."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml import lm_data
    from skillbook.ml import long_context as lc
    from skillbook.ml.hf_models import resolve_model
    from skillbook.ml.synthetic import write_default_data
    from skillbook.ml.training import precision

    # ---- fail fast: a rotary model, before anything trains -------------------------------------------
    model_ref = resolve_model(cfg.model, "model") if cfg.model else None
    if model_ref:
        lc.rope_family(AutoConfig.from_pretrained(model_ref))
    corpus = artifact_path(cfg.corpus, "corpus") if cfg.corpus else None
    if corpus is None:
        corpus = write_default_data(ctx.out_dir / "data", seed=cfg.seed)["corpus"]
    device = ctx.setup_device(cfg.device)
    if model_ref is None:
        res = ctx.run_skill("pretraining", {"corpus": str(corpus), "seed": cfg.seed, **cfg.model_train})
        model_ref = res["outputs"]["model"]["path"]
    tok = AutoTokenizer.from_pretrained(model_ref)
    base_config = AutoConfig.from_pretrained(model_ref)
    lc.rope_family(base_config)
    n_ctx = lc.context_of(base_config)
    lengths = [n_ctx, int(n_ctx * cfg.factor / 2), int(n_ctx * cfg.factor)]
    lengths = sorted(set(lengths))

    # ---- data: the corpus tokenised once; passkey documents are built from its train tokens ----------
    train_texts, val_texts, note = corpus_sources(corpus, "corpus", cfg.val_fraction, cfg.seed)
    ctx.info(note)
    data = lm_data.load_tokens({"train": train_texts, "val": val_texts}, tok, max(lengths))
    sources = {"train": data["train"], "passkeys": lc.PasskeyMaker(tok, data["train"], cfg.seed)}
    precision.seed_everything(cfg.seed)
    base = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    dtype, _ = ctx.choose_dtype(cfg.dtype, n_params)
    ctx.info(f"{base.config.model_type}, {n_params / 1e6:.2f}M params, context {n_ctx}, {device} {dtype}")

    # ---- the passkey task at the trained context: one base for every method ---------------------------
    if cfg.task_steps:
        train(base, cfg, ctx, sources, n_ctx, cfg.task_steps, cfg.lr, "task")
    out: dict[str, Path] = {"base_model": ctx.out_dir / "base"}
    base_dir = out["base_model"]
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    del base

    def measure(model: Any) -> dict:
        model.eval()
        maker = lc.PasskeyMaker(tok, data["val"], cfg.seed + 1)  # the same held-out prompts for every model
        with precision.autocast(device, dtype):
            return {
                n: {
                    "ppl": lc.perplexity_at(model, data["val"], n, cfg.eval_windows, device),
                    "passkey": lc.passkey_accuracy(model, maker, n, cfg.passkey_trials, device),
                }
                for n in lengths
            }

    # ---- every method: as is, then fine-tuned at the longest length -----------------------------------
    results: dict[str, dict] = {}
    for method in cfg.methods:
        config = lc.scaled_config(base_config, method, cfg.factor, cfg.yarn_beta_fast)
        t0 = time.time()
        model = AutoModelForCausalLM.from_pretrained(base_dir, config=config, dtype=torch.float32).to(device)
        results[method] = {"as_is": measure(model)}
        if cfg.finetune_steps:
            precision.seed_everything(cfg.seed)  # the same batches for every method
            hist = train(
                model, cfg, ctx, sources, max(lengths), cfg.finetune_steps, cfg.finetune_lr, f"finetune-{method}"
            )
            results[method] |= {"finetuned": measure(model), "loss_first": hist[0], "loss_last": hist[-1]}
        results[method]["seconds"] = time.time() - t0
        if method == cfg.keep or cfg.save_all:  # the scaling lives in config.json: it reloads as it ran
            save_dir = ctx.out_dir / "finetuned" / method
            model.save_pretrained(save_dir)
            tok.save_pretrained(save_dir)
            if method == cfg.keep:
                out["model"] = save_dir
        del model
    out["report"] = write_results(cfg, ctx, results, lengths)
    return out


def write_results(cfg: Config, ctx: RunContext, r: dict, lengths: list[int]) -> Path:
    """Summary keys `<method>_<stage>_<length>_{ppl,passkey}` and one table per stage in report.md."""
    stages = ["as_is"] + (["finetuned"] if cfg.finetune_steps else [])
    for m, res in r.items():
        for stage in stages:
            for n in lengths:
                ctx.summary[f"{m}_{stage}_{n}_ppl"] = round(res[stage][n]["ppl"], 3)
                ctx.summary[f"{m}_{stage}_{n}_passkey"] = round(res[stage][n]["passkey"], 3)
    ctx.summary.update(lengths=lengths, factor=cfg.factor, methods=list(r))
    head = " | ".join(f"ppl {n}" for n in lengths) + " | " + " | ".join(f"passkey {n}" for n in lengths)
    lines = [
        "# long-context",
        "",
        f"Trained context {lengths[0]}; RoPE scaled by {cfg.factor:g}; perplexity on {cfg.eval_windows} held-out "
        f"windows and passkey accuracy over {cfg.passkey_trials} prompts per length; fine-tune = "
        f"{cfg.finetune_steps} steps x {cfg.batch_size} sequences of {lengths[-1]} tokens "
        f"({cfg.passkey_share:.0%} passkey documents).",
    ]
    for stage in stages:
        lines += [
            "",
            f"## {stage.replace('_', ' ')}",
            "",
            f"| method | {head} |",
            "|---" + "|---:" * 2 * len(lengths) + "|",
        ]
        for m, res in r.items():
            row = [f"{res[stage][n]['ppl']:.2f}" for n in lengths] + [
                f"{res[stage][n]['passkey']:.2f}" for n in lengths
            ]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[2:]))
    return ctx.out_dir / "report.md"
