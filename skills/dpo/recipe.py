"""Direct Preference Optimization (DPO) with TRL's DPOTrainer and a PEFT LoRA adapter.

Story: read {prompt, chosen, rejected} pairs -> load the SFT model -> measure held-out preference
accuracy (log p(chosen) > log p(rejected)) -> train a LoRA adapter with the DPO loss, the frozen
base (adapters disabled) serving as the reference model -> save the adapter -> merge, reload and
verify logits -> measure again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from skillbook.ml.data_files import DataPath, EvalDataPath
from skillbook.ml.finetune_data import default_data, held_out_rows, pair_rows, to_dataset
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
INPUTS = {"model": "hf-model", "data": "preference-data", "eval_data": "sft-data"}
PAIR = ("prompt", "chosen", "rejected")


class Config(BlockConfig):
    # --- inputs -------------------------------------------------------------------------------
    model: str = Field(
        ...,
        description="Policy to start from, normally the sft run's merged 'model' output "
        "(a local hf-model directory with its tokenizer, or a hub id when online).",
    )
    data: DataPath | None = Field(
        None,
        description="Pairs {prompt, chosen, rejected}: a .jsonl/.json/.parquet file (split by eval_fraction) or "
        "a preference-data folder (train.jsonl + test.jsonl); None = the embedded synthetic pairs.",
    )
    eval_data: EvalDataPath | None = Field(
        None,
        description="Held-out {prompt, completion} rows for exact match before/after: a file (every row) or a "
        "folder (test.jsonl, or eval/validation); None = the embedded eval set when data is None, else skipped.",
    )
    eval_fraction: float = Field(
        0.1, gt=0, le=0.5, description="Share of a single data file (or a train-only folder) held out, seeded by seed."
    )
    # --- DPO ----------------------------------------------------------------------------------
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL anchor to the reference: small = move far from "
        "the SFT model, large = stay close. 0.1 is the paper's default.",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero"] = Field(
        "sigmoid",
        description="sigmoid = the DPO paper's loss; ipo = squared loss, robust to noisy/over-fitted "
        "preferences (use beta 0.5-1.0 with it); hinge = SLiC.",
    )
    sft_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of an NLL loss on the chosen answer added to the DPO "
        "loss (RPO; TRL loss_type 'sft'). Plain DPO lowers the chosen "
        "answer's likelihood along with the rejected one's and greedy "
        "answers get worse; 1.0 keeps them; 0 = plain DPO.",
    )
    method: Literal["lora", "qlora"] = Field(
        "lora",
        description="lora: adapter on the frozen policy, whose "
        "adapter-free self is the reference (no second "
        "copy in memory); qlora: the same on a 4-bit base.",
    )
    lora: LoRA = Field(LoRA(), description="The adapter on the policy: rank, alpha, dropout, target modules.")
    # --- optimisation -------------------------------------------------------------------------
    steps: int = Field(80, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Preference pairs per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optim: Optim = Field(
        Optim(lr=2e-3, warmup_ratio=0.1),
        description="AdamW + schedule. lr: tiny model + LoRA 5e-4..2e-3; 7B + LoRA 5e-6..5e-5; "
        "7B full 5e-7..1e-6 (TRL's default 1e-6).",
    )
    max_length: int = Field(128, ge=8, description="Token budget for prompt + answer.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (GPU memory saver; slower, off for tiny CPU runs)."
    )
    seed: int = Field(0, description="Random seed.")
    precision: Precision = Field(Precision(), description="Weight dtype and mixed-precision autocast.")
    logging: Logging = Field(Logging(), description="Metric cadence and external trackers.")
    # --- evaluation ---------------------------------------------------------------------------
    eval_limit: int = Field(500, ge=1, description="At most this many held-out pairs / questions per metric.")
    max_new_tokens: int = Field(8, ge=1, description="Greedy tokens per held-out question for exact match.")


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    from trl import DPOConfig, DPOTrainer

    from skillbook.ml.evaluate import exact_match, preference_accuracy

    # ---- data: checked first, so a file missing a column fails before any model is loaded ---
    train_rows, test_rows = pair_rows(ctx, cfg.data, cfg.eval_fraction, cfg.seed, PAIR)
    test_rows = test_rows[: cfg.eval_limit]
    eval_ref = cfg.eval_data or (default_data(ctx, "eval_data") if cfg.data is None else None)
    qa_rows = held_out_rows(ctx, eval_ref, "eval_data")[: cfg.eval_limit] if eval_ref else []
    model_ref = resolve_model(cfg.model)
    ctx.info(f"LoRA targets: {', '.join(lora_targets(model_ref, cfg.lora))}")  # a misfit fails before loading

    # ---- policy (and, through LoRA, reference) model ----------------------------------------
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(model_ref)
    model = load_causal_lm(model_ref, "4bit" if cfg.method == "qlora" else "none", cfg.precision.weights)
    model.generation_config.pad_token_id = tok.pad_token_id
    ctx.info(
        f"policy {model_ref}: {count_params(model)[1] / 1e6:.2f} M parameters; "
        f"{len(train_rows)} train pairs, {len(test_rows)} held-out pairs"
    )

    pref_before = preference_accuracy(model, tok, test_rows)
    em_before = exact_match(model, tok, qa_rows, cfg.max_new_tokens)["exact_match"] if qa_rows else None
    ctx.info(
        f"held-out preference accuracy before DPO: {pref_before['preference_accuracy']:.3f} "
        f"(mean margin {pref_before['mean_margin']:.2f} nats)"
    )

    # ---- trainer: no ref_model -> with a peft_config TRL uses the base with adapters disabled --
    # (trl_args maps steps, batch and the optim/precision/logging blocks; the keywords here are DPO's own)
    # RPO: TRL sums the listed losses; an NLL term on the chosen answer keeps greedy answers from degrading
    loss_types: list[str] = [cfg.loss_type]
    weights = [1.0]
    if cfg.sft_weight:
        loss_types, weights = loss_types + ["sft"], weights + [cfg.sft_weight]
    args = DPOConfig(
        **trl_args(
            cfg,
            ctx.out_dir / "trainer",
            beta=cfg.beta,
            max_length=cfg.max_length,
            loss_type=loss_types,
            loss_weights=weights,
        )
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        processing_class=tok,
        train_dataset=to_dataset(train_rows, PAIR),
        peft_config=lora_config(cfg.lora),
        callbacks=[log_callback(ctx, cfg.steps)],
    )
    quiet_trainer(trainer)
    trainable, total = count_params(trainer.model)
    ctx.info(
        f"training {trainable:,} of {total:,} parameters; beta={cfg.beta}, loss={cfg.loss_type}, {precision_name(args)}"
    )
    trainer.train()
    losses = metric_history(trainer, "loss")
    margins = metric_history(trainer, "rewards/margins")
    accuracies = metric_history(trainer, "rewards/accuracies")

    # ---- save: adapter + tokenizer (every rank: gathers FSDP/ZeRO-3 shards), merged model (verified)
    adapter_dir, model_dir = ctx.out_dir / "adapter", ctx.out_dir / "model"
    if not finish_training(trainer, ctx, adapter_dir):
        return {"adapter": adapter_dir, "model": model_dir}  # the other ranks: rank 0 writes these
    tuned = trainer.model
    if cfg.method == "qlora" or sharded(trainer):  # merge into a bf16 copy of the base: never 4-bit or a shard
        tuned = reload_adapter_bf16(model_ref, adapter_dir)
    merge_diff = merge_and_save(tuned, tok, model_dir, [r["prompt"] + r["chosen"] for r in test_rows[:4]])
    ctx.info(f"merged model reloaded; max |logit difference| vs adapter model = {merge_diff:.2e}")

    # ---- measure again on the merged model --------------------------------------------------
    merged = load_causal_lm(str(model_dir), weights=cfg.precision.weights)
    pref_after = preference_accuracy(merged, tok, test_rows)
    ctx.info(
        f"held-out preference accuracy after DPO: {pref_after['preference_accuracy']:.3f} "
        f"(before {pref_before['preference_accuracy']:.3f}); mean margin {pref_after['mean_margin']:.2f} nats"
    )
    ctx.summary.update(
        preference_accuracy_before=pref_before["preference_accuracy"],
        preference_accuracy_after=pref_after["preference_accuracy"],
        preference_margin_before=pref_before["mean_margin"],
        preference_margin_after=pref_after["mean_margin"],
        train_reward_margin_last=margins[-1] if margins else float("nan"),
        train_reward_accuracy_last=accuracies[-1] if accuracies else float("nan"),
        train_loss_first=losses[0] if losses else float("nan"),
        train_loss_last=losses[-1] if losses else float("nan"),
        merge_max_logit_diff=merge_diff,
    )
    if qa_rows:
        em_after = exact_match(merged, tok, qa_rows, cfg.max_new_tokens)["exact_match"]
        ctx.summary.update(exact_match_before=em_before, exact_match_after=em_after)
    ctx.report(report_md("DPO", f"{cfg.method}, beta={cfg.beta}, loss={cfg.loss_type}", model_ref, ctx.summary, losses))
    return {"adapter": adapter_dir, "model": model_dir}
