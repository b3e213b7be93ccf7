"""Supervised fine-tuning (SFT) with TRL's SFTTrainer and a PEFT LoRA adapter.

Story: read prompt/completion pairs -> load the base model -> measure held-out exact match ->
train LoRA (or full / QLoRA) with loss on completions only -> save the adapter -> merge it into
the base, reload the merged model and check its logits equal the adapter model's -> measure again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from skillbook.errors import ConfigError
from skillbook.ml.data_files import DataPath, EvalDataPath
from skillbook.ml.finetune_data import question_rows, render_chat, to_dataset
from skillbook.ml.hf_models import (
    count_params,
    load_causal_lm,
    load_tokenizer,
    lora_config,
    lora_targets,
    merge_and_save,
    reload_adapter_bf16,
    resolve_model,
)
from skillbook.ml.posttrain import (
    finish_training,
    log_callback,
    metric_history,
    precision_name,
    quiet_trainer,
    report_md,
    sharded,
    trl_args,
)
from skillbook.run.blocks import BlockConfig, Logging, LoRA, Optim, Precision
from skillbook.run.runner import RunContext

OUTPUTS = {"adapter": "adapter", "model": "hf-model"}
INPUTS = {"model": "hf-model", "data": "sft-data", "eval_data": "sft-data"}


class Config(BlockConfig):
    # --- inputs -------------------------------------------------------------------------------
    model: str = Field(
        ...,
        description="Base model: a local hf-model directory (with its tokenizer), e.g. the "
        "pretraining run's 'model' output, or a hub id when online.",
    )
    data: DataPath | None = Field(
        None,
        description="Rows {prompt, completion}: a .jsonl/.json/.parquet file (split by eval_fraction unless "
        "eval_data is set) or an sft-data folder (train.jsonl + test.jsonl); None = the embedded synthetic data.",
    )
    eval_data: EvalDataPath | None = Field(
        None,
        description="Held-out rows for exact match before/after: a file (every row) or a folder (test.jsonl, "
        "or eval/validation); None = data's held-out part, or the embedded eval set when data is None.",
    )
    eval_fraction: float = Field(
        0.1, gt=0, le=0.5, description="Share of a single data file held out (seeded by seed) when eval_data is None."
    )
    # --- method -------------------------------------------------------------------------------
    method: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="lora: train a LoRA adapter on a frozen base; qlora: the same on a 4-bit base "
        "(CUDA + bitsandbytes); full: update every weight (no adapter).",
    )
    lora: LoRA = Field(LoRA(), description="The adapter (method lora/qlora): rank, alpha, dropout, target modules.")
    chat_template: bool = Field(
        False,
        description="Render each prompt through the tokenizer's chat template "
        "(training and the exact-match evaluation alike); false = plain "
        "'Question: ...\\nAnswer:' text, as the data is written.",
    )
    # --- optimisation -------------------------------------------------------------------------
    steps: int = Field(120, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optim: Optim = Field(
        Optim(lr=2e-3, warmup_ratio=0.05),
        description="AdamW + schedule. lr: LoRA on the tiny model 1e-3..3e-3 (a 1 M-parameter model needs "
        "~100x TRL's 2e-5 to move in 120 steps); LoRA on 7B 1e-4..2e-4; full fine-tuning on 7B 1e-5..2e-5.",
    )
    max_length: int = Field(128, ge=8, description="Token budget per sequence (the packed block length with packing).")
    packing: bool = Field(
        False,
        description="Pack several examples into one max_length block (BFD, no cross-"
        "contamination with flash-attention); worth it for long, varied data.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in backward: saves memory on GPUs, costs ~30% time; off for tiny CPU runs.",
    )
    seed: int = Field(0, description="Random seed (data order, adapter init).")
    precision: Precision = Field(Precision(), description="Weight dtype and mixed-precision autocast.")
    logging: Logging = Field(Logging(), description="Metric cadence and external trackers.")
    # --- evaluation ---------------------------------------------------------------------------
    eval_limit: int = Field(500, ge=1, description="At most this many held-out rows for exact match.")
    max_new_tokens: int = Field(8, ge=1, description="Greedy tokens generated per held-out prompt.")


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    from trl import SFTConfig, SFTTrainer

    from skillbook.ml.evaluate import exact_match

    # ---- data: checked first, so a bad file fails before any model is loaded ----------------
    train_rows, eval_rows = question_rows(ctx, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed)
    eval_rows = eval_rows[: cfg.eval_limit]
    model_ref = resolve_model(cfg.model)
    if cfg.method != "full":  # checked on a weightless skeleton: a target that fits no layer fails here
        ctx.info(f"LoRA targets: {', '.join(lora_targets(model_ref, cfg.lora))}")

    # ---- model + tokenizer ------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(model_ref)
    if cfg.chat_template:  # same rendering for training and evaluation, or the metric measures a mismatch
        if not tok.chat_template:
            raise ConfigError(f"chat_template: the tokenizer of {model_ref} has no chat template; set it false")
        train_rows, eval_rows = render_chat(tok, train_rows), render_chat(tok, eval_rows)
    model = load_causal_lm(model_ref, "4bit" if cfg.method == "qlora" else "none", cfg.precision.weights)
    model.generation_config.pad_token_id = tok.pad_token_id
    ctx.info(
        f"base model {model_ref}: {count_params(model)[1] / 1e6:.2f} M parameters; "
        f"{len(train_rows)} train rows, {len(eval_rows)} held-out rows"
    )

    em_before = exact_match(model, tok, eval_rows, cfg.max_new_tokens)["exact_match"]
    ctx.info(f"held-out exact match before SFT: {em_before:.3f}")

    # ---- trainer: TRL tokenizes prompt+completion, appends eos, masks the prompt out of the loss
    # (trl_args maps steps, batch and the optim/precision/logging blocks; the keywords here are SFT's own)
    peft_config = None if cfg.method == "full" else lora_config(cfg.lora)
    args = SFTConfig(
        **trl_args(
            cfg, ctx.out_dir / "trainer", max_length=cfg.max_length, packing=cfg.packing, completion_only_loss=True
        )
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        processing_class=tok,
        peft_config=peft_config,
        train_dataset=to_dataset(train_rows, ("prompt", "completion")),
        callbacks=[log_callback(ctx, cfg.steps)],
    )
    quiet_trainer(trainer)
    trainable, total = count_params(trainer.model)
    ctx.info(
        f"method={cfg.method}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), "
        f"{precision_name(args)}"
    )
    trainer.train()
    losses = metric_history(trainer, "loss")

    # ---- save (every rank: gathers FSDP/ZeRO-3 shards) the adapter, or the full model ---------
    model_dir = ctx.out_dir / "model"
    # full fine-tuning has no adapter: the output points at the full model
    adapter_dir = model_dir if cfg.method == "full" else ctx.out_dir / "adapter"
    if not finish_training(trainer, ctx, adapter_dir):
        return {"adapter": adapter_dir, "model": model_dir}  # the other ranks: rank 0 writes these
    if cfg.method == "full":
        merge_diff = 0.0
    else:  # then rank 0 alone: merge (verified) and save the merged model with its tokenizer
        tuned = trainer.model
        if cfg.method == "qlora" or sharded(trainer):  # into a bf16 copy of the base: never 4-bit or a shard
            tuned = reload_adapter_bf16(model_ref, adapter_dir)
        merge_diff = merge_and_save(tuned, tok, model_dir, [r["prompt"] + r["completion"] for r in eval_rows[:4]])
        ctx.info(f"merged model reloaded; max |logit difference| vs adapter model = {merge_diff:.2e}")

    # ---- measure again on the merged model --------------------------------------------------
    merged = load_causal_lm(str(model_dir), weights=cfg.precision.weights)
    em_after = exact_match(merged, tok, eval_rows, cfg.max_new_tokens)["exact_match"]
    ctx.info(f"held-out exact match after SFT: {em_after:.3f} (before {em_before:.3f})")
    ctx.summary.update(
        exact_match_before=em_before,
        exact_match_after=em_after,
        train_loss_first=losses[0] if losses else float("nan"),
        train_loss_last=losses[-1] if losses else float("nan"),
        merge_max_logit_diff=merge_diff,
        trainable_params=trainable,
    )
    ctx.report(report_md("SFT", cfg.method, model_ref, ctx.summary, losses))
    return {"adapter": adapter_dir, "model": model_dir}
