"""Reward modelling with TRL's RewardTrainer: a scalar-head model that scores chosen above rejected.

Story: read {prompt, chosen, rejected} pairs -> load the causal LM as a sequence classifier with one
output (a fresh linear `score` head on the last token) -> measure held-out pairwise accuracy ->
train with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) -> save (LoRA merged into the
weights) -> reload with AutoModelForSequenceClassification and measure again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from skillbook.errors import ConfigError
from skillbook.ml.data_files import DataPath
from skillbook.ml.finetune_data import pair_rows, to_dataset
from skillbook.ml.hf_models import (
    count_params,
    load_tokenizer,
    lora_config,
    lora_targets,
    resolve_model,
    weights_dtype,
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
from skillbook.ml.rewards import pairwise_accuracy
from skillbook.run.blocks import BlockConfig, Logging, LoRA, Optim, Precision
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "hf-model"}
INPUTS = {"model": "hf-model", "data": "preference-data"}
PAIR = ("prompt", "chosen", "rejected")


class Config(BlockConfig):
    # --- inputs -------------------------------------------------------------------------------
    model: str = Field(
        ...,
        description="Backbone: a local hf-model directory (normally the sft model, which "
        "already reads the prompt format) or a hub id when online.",
    )
    data: DataPath | None = Field(
        None,
        description="Pairs {prompt, chosen, rejected}: a .jsonl/.json/.parquet file (split by eval_fraction) or "
        "a preference-data folder (train.jsonl + test.jsonl); None = the embedded synthetic pairs.",
    )
    eval_fraction: float = Field(
        0.1, gt=0, le=0.5, description="Share of a single data file (or a train-only folder) held out, seeded by seed."
    )
    # --- method -------------------------------------------------------------------------------
    method: Literal["full", "lora"] = Field(
        "full",
        description="full: train every weight (best for small backbones); lora: adapters + a fully "
        "trained score head (the way to fit 7B+ reward models).",
    )
    lora: LoRA = Field(
        LoRA(), description="The adapter (method lora; the score head is trained fully): rank, alpha, dropout, targets."
    )
    center_rewards: float | None = Field(
        0.01,
        ge=0,
        description="Weight of the penalty that keeps mean reward near "
        "0 (TRL's center_rewards_coefficient); None = off.",
    )
    # --- optimisation -------------------------------------------------------------------------
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Preference pairs per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optim: Optim = Field(
        Optim(lr=5e-4, warmup_ratio=0.1),
        description="AdamW + schedule. lr: tiny full 3e-4..1e-3; 7B full 5e-6..1e-5; 7B LoRA 5e-5..2e-4.",
    )
    max_length: int = Field(128, ge=8, description="Token budget for prompt + answer.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (GPU memory saver).")
    seed: int = Field(0, description="Random seed (score-head init, data order).")
    precision: Precision = Field(
        Precision(weights="float32"),
        description="Weight dtype and mixed-precision autocast. Weights load in float32 here: the fresh score "
        "head and a full fine-tune need fp32 master weights (bf16 autocast still applies on GPUs).",
    )
    logging: Logging = Field(Logging(), description="Metric cadence and external trackers.")
    eval_limit: int = Field(500, ge=1, description="At most this many held-out pairs for pairwise accuracy.")


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    # ---- data: checked first, so a file missing a column fails before any model is loaded ---
    train_rows, test_rows = pair_rows(ctx, cfg.data, cfg.eval_fraction, cfg.seed, PAIR)
    test_rows = test_rows[: cfg.eval_limit]
    model_ref = resolve_model(cfg.model)
    if cfg.method == "lora":  # checked on a weightless skeleton: a target that fits no layer fails here
        ctx.info(f"LoRA targets: {', '.join(lora_targets(model_ref, cfg.lora, 'SEQ_CLS'))}")

    # ---- backbone + a fresh one-output score head -------------------------------------------
    torch.manual_seed(cfg.seed)  # the score head is random: seed before creating it
    tok = load_tokenizer(model_ref)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_ref, num_labels=1, dtype=weights_dtype(cfg.precision.weights)
    )
    # The classifier reads the last non-pad token, so the model must know which id is padding.
    model.config.pad_token_id = tok.pad_token_id
    ctx.info(
        f"reward model on {model_ref}: {count_params(model)[1] / 1e6:.2f} M parameters; "
        f"{len(train_rows)} train pairs, {len(test_rows)} held-out pairs"
    )
    acc_before, _ = pairwise_accuracy(model, tok, test_rows)
    ctx.info(f"held-out pairwise accuracy with the untrained head: {acc_before:.3f}")

    # ---- trainer: Bradley-Terry loss on (prompt+chosen, prompt+rejected) ---------------------
    # (trl_args maps steps, batch and the optim/precision/logging blocks; the keywords here are the RM's own)
    peft_config = None if cfg.method == "full" else lora_config(cfg.lora, task_type="SEQ_CLS")
    args = RewardConfig(
        **trl_args(
            cfg, ctx.out_dir / "trainer", max_length=cfg.max_length, center_rewards_coefficient=cfg.center_rewards
        )
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        processing_class=tok,
        peft_config=peft_config,
        train_dataset=to_dataset(train_rows, PAIR),
        callbacks=[log_callback(ctx, cfg.steps)],
    )
    quiet_trainer(trainer)
    if cfg.method == "lora" and sharded(trainer):  # the merge below needs the whole model on rank 0
        raise ConfigError("method=lora under FSDP/DeepSpeed: the adapter merge needs a full replica; use DDP or full")
    trainable, total = count_params(trainer.model)
    ctx.info(f"method={cfg.method}: training {trainable:,} of {total:,} parameters, {precision_name(args)}")
    trainer.train()
    losses = metric_history(trainer, "loss")

    # ---- save: one hf-model directory (adapters merged) with its tokenizer -------------------
    # full: every rank saves (gathers FSDP/ZeRO-3 shards); lora: rank 0 merges its replica, then saves
    model_dir = ctx.out_dir / "model"
    if not finish_training(trainer, ctx, model_dir if cfg.method == "full" else None):
        return {"model": model_dir}  # the other ranks: rank 0 writes it
    if cfg.method == "lora":
        trainer.model.merge_and_unload().save_pretrained(model_dir)
        tok.save_pretrained(model_dir)

    # ---- reload the way users will, and measure on held-out pairs ---------------------------
    reloaded = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    acc_after, margin = pairwise_accuracy(reloaded, tok, test_rows)
    ctx.info(
        f"held-out pairwise accuracy: {acc_after:.3f} (untrained head {acc_before:.3f}); "
        f"mean reward margin {margin:.2f}"
    )
    ctx.summary.update(
        pairwise_accuracy=acc_after,
        pairwise_accuracy_before=acc_before,
        mean_reward_margin=margin,
        train_loss_first=losses[0] if losses else float("nan"),
        train_loss_last=losses[-1] if losses else float("nan"),
        trainable_params=trainable,
    )
    ctx.report(report_md("Reward model", cfg.method, model_ref, ctx.summary, losses))
    return {"model": model_dir}
