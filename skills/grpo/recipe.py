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

from skillbook.ml import posttrain as pt
from skillbook.recipe import RecipeConfig
from skillbook.runner import RunContext

OUTPUTS = {"adapter": "adapter", "model": "hf-model"}
INPUTS = {"model": "hf-model", "data": "sft-data", "eval_data": "sft-data"}


class Config(RecipeConfig):
    # --- inputs -------------------------------------------------------------------------------
    model: str = Field(..., description="Policy to start from, normally the sft run's merged 'model' output: GRPO "
                                        "only learns from questions the model sometimes answers right.")
    data: str | None = Field(None, description="sft-data directory: train.jsonl rows {prompt, completion}; the "
                                               "completion is the verifiable answer. None = the embedded world.")
    eval_data: str | None = Field(None, description="Held-out sft-data directory (test.jsonl) for mean reward "
                                                    "before/after; None = the embedded eval set, or <data>/test.jsonl.")
    # --- GRPO ---------------------------------------------------------------------------------
    num_generations: int = Field(8, ge=2, description="Group size G: answers sampled per question; the advantage is "
                                                      "each answer's reward minus its group's mean (over the std).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for the groups (and the mean-reward "
                                                      "measurement); diversity inside a group is the learning signal.")
    max_completion_length: int = Field(8, ge=1, description="Tokens sampled per answer.")
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference (0 = none, TRL's default; 0.001-0.04 "
                                               "keeps long runs near the SFT model).")
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = Field(
        "dapo", description="How token losses are averaged; dapo (TRL default) removes the length bias of grpo.")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (update scaled by alpha/r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_targets: list[str] = Field(default_factory=lambda: list(pt.LLAMA_LORA_TARGETS),
                                    description="Module-name suffixes that get adapters.")
    # --- optimisation -------------------------------------------------------------------------
    steps: int = Field(40, ge=1, description="Optimizer steps (one group batch sampled per step).")
    batch_size: int = Field(32, ge=1, description="Completions per device per step (= questions x num_generations); "
                                                  "must be a multiple of num_generations.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate. Tiny model + LoRA: 5e-4..2e-3; 7B + LoRA: 1e-5..5e-5; "
                                              "7B full: 1e-6 (TRL's default).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming the LR up.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (GPU memory saver).")
    use_vllm: bool = Field(False, description="Generate the groups with vLLM (GPU only, colocated with training).")
    seed: int = Field(0, description="Random seed (sampling, data order).")
    # --- evaluation ---------------------------------------------------------------------------
    eval_limit: int = Field(200, ge=1, description="At most this many held-out questions.")
    eval_samples: int = Field(4, ge=1, description="Sampled answers per held-out question for the mean reward.")

    @model_validator(mode="after")
    def _groups_fill_the_batch(self) -> "Config":
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ValueError(f"batch_size x grad_accum ({self.batch_size * self.grad_accum}) must be a multiple of "
                             f"num_generations ({self.num_generations}), so every group is complete")
        return self


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from skillbook.ml.evaluate import exact_match

    # ---- data: questions with verifiable answers, checked before any model is loaded --------
    if cfg.data is None:
        data_dir = pt.default_data(ctx, "sft_data")
        eval_dir = Path(cfg.eval_data) if cfg.eval_data else pt.default_data(ctx, "eval_data")
    else:
        data_dir = pt.artifact_dir(cfg.data, "data")
        eval_dir = Path(cfg.eval_data) if cfg.eval_data else data_dir
    train_rows = pt.read_split(data_dir, "train", ("prompt", "completion"), "data")
    eval_rows = pt.read_split(eval_dir, "test", ("prompt", "completion"), "eval_data")[: cfg.eval_limit]
    model_ref = pt.resolve_model(cfg.model)

    # ---- the verifiable reward: 1 if the answer (first line, normalised) is exactly right ----
    def exact_match_reward(prompts, completions, answer, **_) -> list[float]:
        return [pt.answer_reward(c, a) for c, a in zip(completions, answer)]

    # ---- policy -----------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    tok = pt.load_tokenizer(model_ref)
    tok.padding_side = "left"  # generation continues from the right end of every prompt
    model = pt.load_causal_lm(model_ref)
    model.generation_config.pad_token_id = tok.pad_token_id
    ctx.info(f"policy {model_ref}: {pt.count_params(model)[1] / 1e6:.2f} M parameters; "
             f"{len(train_rows)} train questions, {len(eval_rows)} held-out questions")
    reward_before = pt.mean_sampled_reward(model, tok, eval_rows, cfg.eval_samples, cfg.max_completion_length,
                                           cfg.temperature, cfg.seed)
    em_before = exact_match(model, tok, eval_rows, cfg.max_completion_length)["exact_match"]
    ctx.info(f"held-out mean reward before GRPO: {reward_before:.3f} (greedy exact match {em_before:.3f})")

    # ---- trainer: sample G answers per question, reward, group-normalised advantages ---------
    dataset = pt.to_dataset([{"prompt": r["prompt"], "answer": r["completion"]} for r in train_rows],
                            ("prompt", "answer"))
    args = GRPOConfig(**pt.trl_args(
        ctx.out_dir / "trainer", steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=2, num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, beta=cfg.beta, loss_type=cfg.loss_type, use_vllm=cfg.use_vllm))
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match_reward, args=args, train_dataset=dataset,
                          processing_class=tok,
                          peft_config=pt.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets),
                          callbacks=[pt.log_callback(ctx, cfg.steps)])
    pt.quiet_trainer(trainer)
    trainable, total = pt.count_params(trainer.model)
    ctx.info(f"training {trainable:,} of {total:,} parameters; {cfg.batch_size // cfg.num_generations} questions "
             f"x {cfg.num_generations} samples per step")
    trainer.train()
    train_rewards = pt.metric_history(trainer, "reward")

    # ---- save: adapter, merged model (verified), tokenizer ----------------------------------
    if not ctx.is_main:
        return {}
    adapter_dir, model_dir = ctx.out_dir / "adapter", ctx.out_dir / "model"
    trainer.model.save_pretrained(adapter_dir)
    tok.padding_side = "right"
    tok.save_pretrained(adapter_dir)
    merge_diff = pt.merge_and_save(trainer.model, tok, model_dir, [r["prompt"] + r["completion"] for r in eval_rows[:4]])

    # ---- measure again on the merged model --------------------------------------------------
    merged = pt.load_causal_lm(str(model_dir))
    reward_after = pt.mean_sampled_reward(merged, tok, eval_rows, cfg.eval_samples, cfg.max_completion_length,
                                          cfg.temperature, cfg.seed)
    em_after = exact_match(merged, tok, eval_rows, cfg.max_completion_length)["exact_match"]
    ctx.info(f"held-out mean reward after GRPO: {reward_after:.3f} (before {reward_before:.3f}); "
             f"greedy exact match {em_before:.3f} -> {em_after:.3f}")
    ctx.summary.update(mean_reward_before=reward_before, mean_reward_after=reward_after,
                       exact_match_before=em_before, exact_match_after=em_after,
                       train_reward_first=train_rewards[0] if train_rewards else float("nan"),
                       train_reward_last=train_rewards[-1] if train_rewards else float("nan"),
                       merge_max_logit_diff=merge_diff)
    ctx.report(pt.report_md("GRPO", f"LoRA, G={cfg.num_generations}, loss={cfg.loss_type}", model_ref,
                            ctx.summary, pt.metric_history(trainer, "loss")))
    return {"adapter": adapter_dir, "model": model_dir}
