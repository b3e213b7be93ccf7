"""GRPO (group relative policy optimization) with TRL's GRPOTrainer and a verifiable reward.

Story: read questions with known answers -> load the SFT model -> measure the mean reward of sampled
answers on held-out questions -> for each training question sample a group of answers, reward each
by exact match with the known answer, push up answers that beat their group's mean (LoRA adapter) ->
save the adapter -> merge, reload and verify logits -> measure the mean reward again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from skillbook.ml.data_files import DataPath, EvalDataPath
from skillbook.ml.finetune_data import question_rows, to_dataset
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
from skillbook.ml.rewards import answer_reward, mean_sampled_reward
from skillbook.run.blocks import BlockConfig, Logging, LoRA, Optim, Precision
from skillbook.run.runner import RunContext

OUTPUTS = {"adapter": "adapter", "model": "hf-model"}
INPUTS = {"model": "hf-model", "data": "sft-data", "eval_data": "sft-data"}


class Config(BlockConfig):
    # --- inputs -------------------------------------------------------------------------------
    model: str = Field(
        ...,
        description="Policy to start from, normally the sft run's merged 'model' output: GRPO "
        "only learns from questions the model sometimes answers right.",
    )
    data: DataPath | None = Field(
        None,
        description="Rows {prompt, completion} (the completion is the verifiable answer): a .jsonl/.json/"
        ".parquet file (split by eval_fraction unless eval_data is set) or an sft-data folder (train.jsonl + "
        "test.jsonl); None = the embedded world.",
    )
    eval_data: EvalDataPath | None = Field(
        None,
        description="Held-out rows for mean reward before/after: a file (every row) or a folder (test.jsonl, "
        "or eval/validation); None = data's held-out part, or the embedded eval set when data is None.",
    )
    eval_fraction: float = Field(
        0.1, gt=0, le=0.5, description="Share of a single data file held out (seeded by seed) when eval_data is None."
    )
    # --- GRPO ---------------------------------------------------------------------------------
    num_generations: int = Field(
        8,
        ge=2,
        description="Group size G: answers sampled per question; the advantage is "
        "each answer's reward minus its group's mean (over the std).",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="Sampling temperature for the groups (and the mean-reward "
        "measurement); diversity inside a group is the learning signal.",
    )
    max_completion_length: int = Field(8, ge=1, description="Tokens sampled per answer.")
    beta: float = Field(
        0.0,
        ge=0,
        description="KL penalty to the reference (0 = none, TRL's default; 0.001-0.04 "
        "keeps long runs near the SFT model).",
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = Field(
        "dapo", description="How token losses are averaged; dapo (TRL default) removes the length bias of grpo."
    )
    lora: LoRA = Field(LoRA(), description="The adapter on the policy: rank, alpha, dropout, target modules.")
    # --- optimisation -------------------------------------------------------------------------
    steps: int = Field(40, ge=1, description="Optimizer steps (one group batch sampled per step).")
    batch_size: int = Field(
        32,
        ge=1,
        description="Completions per device per step (= questions x num_generations); "
        "must be a multiple of num_generations.",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optim: Optim = Field(
        Optim(lr=1e-3, warmup_ratio=0.05),
        description="AdamW + schedule. lr: tiny model + LoRA 5e-4..2e-3; 7B + LoRA 1e-5..5e-5; "
        "7B full 1e-6 (TRL's default).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (GPU memory saver).")
    use_vllm: bool = Field(False, description="Generate the groups with vLLM (GPU only, colocated with training).")
    seed: int = Field(0, description="Random seed (sampling, data order).")
    precision: Precision = Field(Precision(), description="Weight dtype and mixed-precision autocast.")
    logging: Logging = Field(
        Logging(every=2), description="Metric cadence (every 2 steps: a 40-step run has few) and external trackers."
    )
    # --- evaluation ---------------------------------------------------------------------------
    train_limit: int | None = Field(
        64,
        ge=1,
        description="Train on the first N questions only (None = all): a tiny "
        "policy needs to see each question several times to move.",
    )
    eval_limit: int = Field(500, ge=1, description="At most this many held-out questions.")
    eval_samples: int = Field(4, ge=1, description="Sampled answers per held-out question for the mean reward.")

    @model_validator(mode="after")
    def _groups_fill_the_batch(self) -> Config:
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ValueError(
                f"batch_size x grad_accum ({self.batch_size * self.grad_accum}) must be a multiple of "
                f"num_generations ({self.num_generations}), so every group is complete"
            )
        return self


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from skillbook.ml.evaluate import exact_match

    # ---- data: questions with verifiable answers, checked before any model is loaded --------
    train_rows, eval_rows = question_rows(ctx, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed)
    train_rows, eval_rows = train_rows[: cfg.train_limit], eval_rows[: cfg.eval_limit]
    model_ref = resolve_model(cfg.model)
    ctx.info(f"LoRA targets: {', '.join(lora_targets(model_ref, cfg.lora))}")  # a misfit fails before loading

    # ---- the verifiable reward: 1 if the answer (first line, normalised) is exactly right ----
    def exact_match_reward(prompts, completions, answer, **_) -> list[float]:
        return [answer_reward(c, a) for c, a in zip(completions, answer)]

    # ---- policy -----------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(model_ref)
    tok.padding_side = "left"  # generation continues from the right end of every prompt
    model = load_causal_lm(model_ref, weights=cfg.precision.weights)
    model.generation_config.pad_token_id = tok.pad_token_id
    ctx.info(
        f"policy {model_ref}: {count_params(model)[1] / 1e6:.2f} M parameters; "
        f"{len(train_rows)} train questions, {len(eval_rows)} held-out questions"
    )

    def measure(policy) -> dict[str, float]:
        """Mean sampled reward on the training questions (GRPO's objective) and on held-out ones, greedy EM."""
        kw = dict(
            samples=cfg.eval_samples,
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            seed=cfg.seed,
        )
        return {
            "mean_reward": mean_sampled_reward(policy, tok, train_rows, **kw),
            "heldout_mean_reward": mean_sampled_reward(policy, tok, eval_rows, **kw),
            "heldout_exact_match": exact_match(policy, tok, eval_rows, cfg.max_completion_length)["exact_match"],
        }

    before = measure(model)
    ctx.info(
        f"before GRPO: mean reward {before['mean_reward']:.3f} on the training questions, "
        f"{before['heldout_mean_reward']:.3f} held out (greedy exact match {before['heldout_exact_match']:.3f})"
    )

    # ---- trainer: sample G answers per question, reward, group-normalised advantages ---------
    # (trl_args maps steps, batch and the optim/precision/logging blocks; the keywords here are GRPO's own)
    dataset = to_dataset([{"prompt": r["prompt"], "answer": r["completion"]} for r in train_rows], ("prompt", "answer"))
    args = GRPOConfig(
        **trl_args(
            cfg,
            ctx.out_dir / "trainer",
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            use_vllm=cfg.use_vllm,
        )
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_match_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=lora_config(cfg.lora),
        callbacks=[log_callback(ctx, cfg.steps)],
    )
    quiet_trainer(trainer)
    trainable, total = count_params(trainer.model)
    ctx.info(
        f"training {trainable:,} of {total:,} parameters; {cfg.batch_size // cfg.num_generations} questions "
        f"x {cfg.num_generations} samples per step, {precision_name(args)}"
    )
    trainer.train()
    train_rewards = metric_history(trainer, "reward")

    # ---- save: adapter + tokenizer (every rank: gathers FSDP/ZeRO-3 shards), merged model (verified)
    adapter_dir, model_dir = ctx.out_dir / "adapter", ctx.out_dir / "model"
    tok.padding_side = "right"  # the saved tokenizer pads as the other skills expect
    if not finish_training(trainer, ctx, adapter_dir):
        return {"adapter": adapter_dir, "model": model_dir}  # the other ranks: rank 0 writes these
    tuned = reload_adapter_bf16(model_ref, adapter_dir) if sharded(trainer) else trainer.model  # never a shard
    merge_diff = merge_and_save(tuned, tok, model_dir, [r["prompt"] + r["completion"] for r in eval_rows[:4]])

    # ---- measure again on the merged model --------------------------------------------------
    merged = load_causal_lm(str(model_dir), weights=cfg.precision.weights)
    after = measure(merged)
    ctx.info(
        f"after GRPO: mean reward {after['mean_reward']:.3f} on the training questions (before "
        f"{before['mean_reward']:.3f}), {after['heldout_mean_reward']:.3f} held out (before "
        f"{before['heldout_mean_reward']:.3f})"
    )
    for key in before:
        ctx.summary[f"{key}_before"], ctx.summary[f"{key}_after"] = before[key], after[key]
    ctx.summary.update(
        train_reward_first=train_rewards[0] if train_rewards else float("nan"),
        train_reward_last=train_rewards[-1] if train_rewards else float("nan"),
        merge_max_logit_diff=merge_diff,
    )
    ctx.report(
        report_md(
            "GRPO",
            f"LoRA, G={cfg.num_generations}, loss={cfg.loss_type}",
            model_ref,
            ctx.summary,
            metric_history(trainer, "loss"),
        )
    )
    return {"adapter": adapter_dir, "model": model_dir}
