"""RLHF: online RL of a policy against a learned reward model, with a KL penalty to the reference policy,
using TRL's RLOOTrainer (REINFORCE with a leave-one-out baseline) and a LoRA adapter.

Story: read the prompts -> the policy (the sft skill's model; trained here when not given) and the reward
model (the reward-modeling skill's sequence classifier; trained here on the policy when not given) -> held-out
reward (reward-model score of greedy answers) and exact match before -> for each prompt sample k answers,
score each with the reward model, subtract beta x KL(policy || reference) from the reward, push up the answers
that beat the mean of their k-1 siblings -> save the adapter, merge, reload and verify -> held-out reward and
exact match after, KL of the tuned policy to the reference.
"""

from __future__ import annotations

from pathlib import Path

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
    resolve_model,
    weights_dtype,
)
from skillbook.ml.posttrain import log_callback, metric_history, precision_name, quiet_trainer, trl_args
from skillbook.run.blocks import BlockConfig, Logging, LoRA, Optim, Precision
from skillbook.run.runner import RunContext

OUTPUTS = {"adapter": "adapter", "model": "hf-model"}
INPUTS = {"model": "hf-model", "reward_model": "hf-model", "data": "sft-data", "eval_data": "sft-data"}


class Config(BlockConfig):
    # --- inputs -------------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Policy to start from (also the KL reference): normally the sft run's merged 'model' "
        "output; None = run the pretraining and sft skills' defaults first.",
    )
    reward_model: str | None = Field(
        None,
        description="Reward model: a one-output sequence classifier, normally the reward-modeling run's "
        "'model' output (any tokenizer: it scores text); None = run the reward-modeling skill on the policy.",
    )
    data: DataPath | None = Field(
        None,
        description="Prompt rows {prompt, completion} (only the prompt is used for training): a .jsonl/.json/"
        ".parquet file (split by eval_fraction unless eval_data is set) or an sft-data folder; None = the "
        "embedded world.",
    )
    eval_data: EvalDataPath | None = Field(
        None,
        description="Held-out {prompt, completion} rows for reward, exact match and KL: a file or a folder "
        "(test.jsonl); None = data's held-out part, or the embedded eval set when data is None.",
    )
    eval_fraction: float = Field(
        0.1, gt=0, le=0.5, description="Share of a single data file held out (seeded by seed) when eval_data is None."
    )
    # --- RLOO ---------------------------------------------------------------------------------
    num_generations: int = Field(
        4,
        ge=2,
        description="k: answers sampled per prompt; each answer's baseline is the mean reward of the other k-1.",
    )
    beta: float = Field(
        0.2,
        ge=0,
        description="KL penalty: beta x sum over the answer of log pi/pi_ref is subtracted from its reward. 0.2 "
        "here (TRL's 0.05 let the tiny policy drift twice as far and lose more exact match); 0 = no reference.",
    )
    missing_eos_penalty: float = Field(
        1.0,
        ge=0,
        description="Subtracted from the reward of an answer that does not end (no eos) within "
        "max_completion_length, so the policy cannot earn reward by rambling.",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the k answers (and the KL measurement).")
    max_completion_length: int = Field(8, ge=1, description="Tokens sampled per answer (also for held-out answers).")
    lora: LoRA = Field(LoRA(), description="The adapter on the policy; its adapter-free base is the reference.")
    # --- optimisation -------------------------------------------------------------------------
    steps: int = Field(40, ge=1, description="Optimizer steps (one sampled batch per step).")
    batch_size: int = Field(
        32,
        ge=1,
        description="Answers per device per step (= prompts x num_generations); a multiple of num_generations.",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optim: Optim = Field(
        Optim(lr=1e-3, warmup_ratio=0.05),
        description="AdamW + schedule. lr: tiny model + LoRA 5e-4..2e-3; 1B-8B + LoRA 1e-5..5e-5; full 1e-6..3e-6.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (GPU memory saver).")
    use_vllm: bool = Field(False, description="Sample answers with vLLM (GPU only, colocated with training).")
    seed: int = Field(0, description="Random seed (sampling, data order, defaults trained here).")
    precision: Precision = Field(Precision(), description="Weight dtype and mixed-precision autocast.")
    logging: Logging = Field(Logging(every=2), description="Metric cadence (every 2 steps) and external trackers.")
    # --- evaluation ---------------------------------------------------------------------------
    train_limit: int | None = Field(
        256, ge=1, description="Train on the first N prompts only (None = all); 40 steps x 8 prompts see 320."
    )
    eval_limit: int = Field(300, ge=1, description="At most this many held-out rows for reward and exact match.")
    kl_prompts: int = Field(64, ge=1, description="Held-out prompts whose sampled answers measure the final KL.")

    @model_validator(mode="after")
    def _groups_fill_the_batch(self) -> Config:
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ValueError(
                f"batch_size x grad_accum ({self.batch_size * self.grad_accum}) must be a multiple of "
                f"num_generations ({self.num_generations}), so every prompt's k answers share one batch"
            )
        return self


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from skillbook.ml import rlhf

    # ---- check the inputs before anything trains or loads ----------------------------------
    model_ref = resolve_model(cfg.model) if cfg.model else None
    rm_ref = resolve_model(cfg.reward_model, "reward_model") if cfg.reward_model else None
    if rm_ref:
        rlhf.check_reward_model(rm_ref)
    train_rows, eval_rows = question_rows(ctx, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed)
    train_rows, eval_rows = train_rows[: cfg.train_limit], eval_rows[: cfg.eval_limit]
    if model_ref:
        ctx.info(f"LoRA targets: {', '.join(lora_targets(model_ref, cfg.lora))}")  # a misfit fails before loading
    device = ctx.setup_device("auto")

    # ---- defaults: the policy from the sft skill, the reward model from reward-modeling -----
    # (each runs its CPU-tiny default into a sub-directory of this run; a resumed run reuses it)
    if model_ref is None:
        base = ctx.run_skill("pretraining", {"seed": cfg.seed})["outputs"]["model"]["path"]
        model_ref = ctx.run_skill("sft", {"model": base, "seed": cfg.seed})["outputs"]["model"]["path"]
    if rm_ref is None:
        rm_ref = ctx.run_skill("reward-modeling", {"model": model_ref, "seed": cfg.seed})["outputs"]["model"]["path"]

    # ---- policy and reward model -------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(model_ref)
    model = load_causal_lm(model_ref, weights=cfg.precision.weights).to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    rm_tok = AutoTokenizer.from_pretrained(rm_ref)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_ref, dtype=weights_dtype(cfg.precision.weights))
    rm = rm.to(device).eval()
    rm.config.pad_token_id = rm_tok.pad_token_id  # the classifier reads the last non-pad token
    ctx.info(
        f"policy {model_ref} ({count_params(model)[1] / 1e6:.2f} M), reward model {rm_ref} "
        f"({count_params(rm)[1] / 1e6:.2f} M); {len(train_rows)} train prompts, {len(eval_rows)} held out"
    )

    def measure(policy) -> dict[str, float]:
        return rlhf.heldout(policy, tok, rm, rm_tok, eval_rows, cfg.max_completion_length, cfg.missing_eos_penalty)

    before = measure(model)
    ctx.info(
        f"before RLHF: held-out reward {before['heldout_reward']:.3f}, exact match "
        f"{before['heldout_exact_match']:.3f}, unfinished {before['heldout_unfinished']:.3f}"
    )

    # ---- trainer: k samples per prompt, reward model score - beta x KL, leave-one-out baseline --
    # The reward model is passed as a callable, not as the nn.Module TRL also accepts: TRL would score
    # prompt + completion without the eos that RewardTrainer appended to every training text.
    reward = rlhf.reward_function(rm, rm_tok, rlhf.eos_ids(model, tok), cfg.missing_eos_penalty)
    args = RLOOConfig(
        **trl_args(
            cfg,
            ctx.out_dir / "trainer",
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature,
            beta=cfg.beta,
            use_vllm=cfg.use_vllm,
        )
    )
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=to_dataset(train_rows, ("prompt",)),
        processing_class=tok,
        peft_config=lora_config(cfg.lora),
        callbacks=[log_callback(ctx, cfg.steps)],
    )
    quiet_trainer(trainer)
    trainable, total = count_params(trainer.model)
    ctx.info(
        f"training {trainable:,} of {total:,} parameters; {cfg.batch_size // cfg.num_generations} prompts x "
        f"{cfg.num_generations} samples per step, beta={cfg.beta}, {precision_name(args)}"
    )
    trainer.train()
    train_rewards = metric_history(trainer, "reward")
    train_kl = metric_history(trainer, "kl")

    # ---- save: adapter, merged model (verified), tokenizer ----------------------------------
    if not ctx.is_main:
        return {}
    adapter_dir, model_dir = ctx.out_dir / "adapter", ctx.out_dir / "model"
    trainer.model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    merge_diff = merge_and_save(trainer.model, tok, model_dir, [r["prompt"] + r["completion"] for r in eval_rows[:4]])

    # ---- measure the reloaded policy: reward, exact match, KL to the reference --------------
    tuned = load_causal_lm(str(model_dir), weights=cfg.precision.weights).to(device).eval()
    reference = load_causal_lm(model_ref, weights=cfg.precision.weights).to(device).eval()
    after = measure(tuned)
    prompts = [r["prompt"] for r in eval_rows[: cfg.kl_prompts]]
    kl = rlhf.kl_to_reference(tuned, reference, tok, prompts, cfg.max_completion_length, cfg.temperature, cfg.seed)
    for key in before:
        ctx.summary[f"{key}_before"], ctx.summary[f"{key}_after"] = before[key], after[key]
    ctx.summary.update(
        **kl,
        train_reward_first=train_rewards[0] if train_rewards else float("nan"),
        train_reward_last=train_rewards[-1] if train_rewards else float("nan"),
        train_kl_last=train_kl[-1] if train_kl else float("nan"),
        merge_max_logit_diff=merge_diff,
        policy=model_ref,
        reward_model=rm_ref,
    )
    ctx.info(
        f"after RLHF: held-out reward {before['heldout_reward']:.3f} -> {after['heldout_reward']:.3f}, exact match "
        f"{before['heldout_exact_match']:.3f} -> {after['heldout_exact_match']:.3f}, KL to the reference "
        f"{kl['kl_to_reference']:.3f} nats per answer"
    )
    ctx.report(rlhf.report_md(cfg, before, after, kl, len(train_rows), len(eval_rows), train_rewards))
    return {"adapter": adapter_dir, "model": model_dir}
