"""Model merging: two LoRA adapters trained on different tasks, merged with PEFT's add_weighted_adapter
(linear, cat, TIES, DARE ...) and as whole models (linear, SLERP), each merge scored on both tasks.

Story: split the question rows by kind into two tasks (facts, arithmetic), 10 % of each held out as
validation -> the base model (the
pretraining default, trained here, when `model` is not given) -> one LoRA adapter per task with TRL's
SFTTrainer, same base, same LoRA shape -> both adapters on one PeftModel -> every merge method adds one
more adapter (PEFT) or builds one more model (whole-model lerp/SLERP of the two merged fine-tunes), its
weights / t the ones that keep the most of both gains on the validation rows -> the
score of base, each single adapter and each merge on both tasks' held-out rows -> the merge that keeps the
most of each adapter's gain is merged into the weights and saved as an hf-model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from skillbook.ml import merging
from skillbook.ml.data_files import DataPath, EvalDataPath
from skillbook.run.blocks import BlockConfig, Logging, LoRA, Optim, Precision
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "hf-model", "adapter": "adapter", "report": "report"}
INPUTS = {"model": "hf-model", "data": "sft-data", "eval_data": "preference-data"}
QA = ("prompt", "completion")


class Config(BlockConfig):
    """The defaults are the CPU-tiny run: two rank-8 adapters (facts, arithmetic) on the pretraining default,
    60 steps each, seven merges (weights chosen on validation rows) scored by held-out answer loss per task,
    ~1.5 min on 2 cores."""

    # --- inputs -------------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Base model both adapters train on (an hf-model dir with its tokenizer, or a hub id when "
        "online); None = train the pretraining default here (~1M params).",
    )
    pretrain: dict[str, Any] = Field(
        default_factory=dict, description="pretraining overrides when model is None (e.g. {max_steps: 600})."
    )
    data: DataPath | None = Field(
        None,
        description="Training rows {prompt, completion} (an sft-data folder's train.jsonl, or a file): split into "
        "tasks by question kind; None = the embedded synthetic world.",
    )
    eval_data: EvalDataPath | None = Field(
        None,
        description="Held-out rows {prompt, chosen, rejected} (a preference-data folder's test.jsonl, or a file; "
        "{prompt, completion} do for answer_loss/exact_match) scored per task; None = the embedded held-out "
        "pairs (questions about facts no adapter trained on).",
    )
    tasks: list[Literal["fact", "arithmetic", "reading"]] = Field(
        ["fact", "arithmetic"],
        description="The two question kinds, one adapter each: fact (closed-book recall), arithmetic "
        "('x plus y'), reading (a passage before the question).",
    )
    # --- merging ------------------------------------------------------------------------------
    methods: list[str] = Field(
        ["linear", "cat", "ties", "dare_ties", "dare_linear_svd", "model_linear", "model_slerp"],
        description="Merges to build and score: PEFT add_weighted_adapter combination types ("
        + ", ".join(merging.PEFT_METHODS)
        + ") and whole-model model_linear / model_slerp.",
    )
    weights: list[float] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Weight of each task's adapter in the PEFT merges: 1, 1 adds both updates (task arithmetic) and "
        "counts what both learned (the answer format) twice; 0.5, 0.5 averages them. None = choose each method's "
        "pair out of weight_grid x weight_grid on the validation rows.",
    )
    weight_grid: list[float] = Field(
        [0.5, 0.7, 0.9],
        min_length=1,
        description="Candidate weights per adapter when weights is None (every pair is merged and scored on val).",
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="Share of each task's training rows held out (never trained on) to choose weights and t; "
        "0 = no search (give weights and t).",
    )
    density: float = Field(
        0.5, gt=0, le=1, description="Share of each update kept by ties / dare / magnitude_prune (PEFT's density)."
    )
    t: float | None = Field(
        None,
        ge=0,
        le=1,
        description="model_linear / model_slerp: 0 = the first task's model, 1 = the second's; None = choose it "
        "out of 0.3..0.7 on the validation rows.",
    )
    metric: Literal["answer_loss", "preference_accuracy", "exact_match"] = Field(
        "answer_loss",
        description="Per-task score on held-out rows: answer_loss = mean -log p(right answer | prompt), lower is "
        "better (moves at 1M params); preference_accuracy = log p(right) > log p(wrong); exact_match = greedy "
        "answer is right (use it from ~100M params).",
    )
    eval_limit: int = Field(200, ge=1, description="At most this many held-out rows per task.")
    # --- adapters (TRL SFTTrainer + PEFT LoRA, as the sft skill trains them) --------------------
    lora: LoRA = Field(
        LoRA(r=8, alpha=16),
        description="Both adapters' shape; linear/ties/dare need one rank r for both (cat and *_svd do not).",
    )
    steps: int = Field(60, ge=1, description="Optimizer steps per adapter.")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optim: Optim = Field(
        Optim(lr=3e-3, warmup_ratio=0.05),
        description="AdamW + schedule per adapter. lr 3e-3 for LoRA on the tiny model; 1e-4..2e-4 on 7B.",
    )
    max_length: int = Field(128, ge=8, description="Token budget per training sequence.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations (GPU memory); off on CPU.")
    seed: int = Field(0, description="Seed; adapter i trains with seed + i (independent inits, as in practice).")
    precision: Precision = Field(Precision(), description="Weight dtype and mixed-precision autocast.")
    logging: Logging = Field(Logging(), description="Metric cadence and external trackers.")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in merging.PEFT_METHODS + merging.MODEL_METHODS]
        if unknown or not value or len(set(value)) != len(value):
            raise ValueError(
                f"methods: {unknown or value} - give distinct names out of "
                + ", ".join(merging.PEFT_METHODS + merging.MODEL_METHODS)
            )
        return value

    @model_validator(mode="after")
    def _two_tasks(self) -> Config:
        if len(self.tasks) != 2 or len(set(self.tasks)) != 2:
            raise ValueError(f"tasks: give two different kinds out of {', '.join(merging.KINDS)} (got {self.tasks})")
        if not any(m in merging.PEFT_METHODS for m in self.methods):
            raise ValueError("methods: include at least one PEFT method (the 'adapter' output), e.g. cat")
        if self.val_fraction == 0 and (self.weights is None or self.t is None):
            raise ValueError("val_fraction: 0 leaves no rows to choose weights/t on; give weights and t, or 0.1")
        return self


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    """Split, get the base, train both adapters, merge every way, score, save the best.

    Long: the merges share one PeftModel and one scoring loop, so they read best in one place."""
    import torch
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    from skillbook.ml.finetune_data import to_dataset
    from skillbook.ml.hf_models import load_causal_lm, load_tokenizer, lora_config, lora_targets, resolve_model
    from skillbook.ml.posttrain import log_callback, metric_history, quiet_trainer, trl_args

    # ---- fail fast: the tasks' rows, the model, the LoRA targets ------------------------------------
    train_by, val_by, held_by = merging.task_rows(
        ctx, cfg.data, cfg.eval_data, cfg.tasks, cfg.metric, cfg.eval_limit, cfg.val_fraction, cfg.seed
    )
    model_ref = resolve_model(cfg.model) if cfg.model else None
    if model_ref:
        ctx.info(f"LoRA targets: {', '.join(lora_targets(model_ref, cfg.lora))}")
    else:
        res = ctx.run_skill("pretraining", {"seed": cfg.seed, **cfg.pretrain})
        model_ref = res["outputs"]["model"]["path"]
        ctx.info(f"trained the base model ({res['summary']['params'] / 1e6:.2f}M params) into {model_ref}")
    tok = load_tokenizer(model_ref)
    a, b = cfg.tasks

    # ---- one adapter per task: TRL SFTTrainer, loss on the completion only -----------------------------
    adapter_dirs: dict[str, Path] = {}
    for i, task in enumerate(cfg.tasks):
        torch.manual_seed(cfg.seed + i)  # the LoRA A init: independent, as two teams' adapters would be
        base = load_causal_lm(model_ref, weights=cfg.precision.weights)
        args = SFTConfig(
            **trl_args(cfg, ctx.out_dir / "trainer", max_length=cfg.max_length, completion_only_loss=True)
            | {"seed": cfg.seed + i}
        )
        trainer = SFTTrainer(
            model=base,
            args=args,
            processing_class=tok,
            peft_config=lora_config(cfg.lora),
            train_dataset=to_dataset(train_by[task], QA),
            callbacks=[log_callback(ctx, cfg.steps)],
        )
        quiet_trainer(trainer)
        t0 = time.time()
        trainer.train()
        losses = metric_history(trainer, "loss") or [float("nan")]  # none logged when steps < logging.every
        ctx.info(f"adapter '{task}': loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.time() - t0:.0f} s")
        adapter_dirs[task] = ctx.out_dir / "adapters" / task
        trainer.model.save_pretrained(adapter_dirs[task])
        del trainer, base

    # ---- both adapters on one PeftModel; score base, each single adapter ------------------------------
    base = load_causal_lm(model_ref, weights=cfg.precision.weights)
    peft_model = PeftModel.from_pretrained(base, adapter_dirs[a], adapter_name=a)
    peft_model.load_adapter(adapter_dirs[b], adapter_name=b)
    results: dict[str, dict] = {}
    with peft_model.disable_adapter():
        results["base"] = merging.task_scores(peft_model, tok, held_by, cfg.metric)
    for task in cfg.tasks:
        peft_model.set_adapter(task)
        results[f"adapter {task}"] = merging.task_scores(peft_model, tok, held_by, cfg.metric)
    val_ref = merging.reference_scores(peft_model, tok, [a, b], val_by, cfg.metric) if cfg.val_fraction else {}

    # ---- the merges: PEFT methods add an adapter; whole-model methods interpolate the two fine-tunes ---
    # (weights / t chosen per method on the validation rows, then the merge is scored on the held-out rows)
    merges = ctx.out_dir / "merges"
    for method in (m for m in cfg.methods if m in merging.PEFT_METHODS):
        weights, val_kept = cfg.weights, float("nan")
        if weights is None:
            args = (method, cfg.density, cfg.weight_grid, val_by, val_ref, cfg.metric, cfg.seed)
            weights, val_kept = merging.search_weights(peft_model, tok, [a, b], *args)
            ctx.info(f"{method}: weights {weights} keep {val_kept:.2f} on val")
        torch.manual_seed(cfg.seed)  # DARE drops entries at random: the same merge on every run
        merging.add_merge(peft_model, [a, b], weights, method, method, cfg.density)
        peft_model.set_adapter(method)
        results[method] = merging.task_scores(peft_model, tok, held_by, cfg.metric) | {"weights": weights}
        peft_model.save_pretrained(merges, selected_adapters=[method])  # -> merges/<method>/
    whole = [m for m in cfg.methods if m in merging.MODEL_METHODS]
    states = {t: merging.finetuned_state(model_ref, adapter_dirs[t], cfg.precision.weights) for t in cfg.tasks}
    for method in whole:  # each fine-tune as a full model (base + its adapter merged in), then lerp/SLERP
        model = load_causal_lm(model_ref, weights=cfg.precision.weights)
        t = cfg.t
        if t is None:
            t, val_kept = merging.search_t(model, tok, states[a], states[b], method, val_by, val_ref, cfg.metric)
            ctx.info(f"{method}: t {t} keeps {val_kept:.2f} on val")
        merged_sd, lerped = merging.merge_state_dicts(states[a], states[b], method, t)
        model.load_state_dict(merged_sd)
        results[method] = merging.task_scores(model, tok, held_by, cfg.metric) | {"t": t}
        if method == "model_slerp":
            ctx.info(f"model_slerp: {lerped:.0%} of the tensors nearly parallel (lerp fallback)")
        model.save_pretrained(merges / method)
        tok.save_pretrained(merges / method)
    del states

    # ---- what each merge keeps of each adapter's gain; save the best merged into the weights ---------
    ranked = merging.rank(results, cfg.methods, cfg.tasks, merging.HIGHER_IS_BETTER[cfg.metric])
    best = ranked[0]
    best_peft = next(m for m in ranked if m in merging.PEFT_METHODS)
    model_dir = ctx.out_dir / "model"
    if best in merging.PEFT_METHODS:
        peft_model.set_adapter(best)
        for name in list(peft_model.peft_config):
            if name != best:
                peft_model.delete_adapter(name)
        peft_model.merge_and_unload().save_pretrained(model_dir)
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(merges / best).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ctx.info(f"best merge: {best} (keeps >= {results[best]['min_kept']:.0%} of each adapter's gain) -> {model_dir}")
    report = write_results(cfg, ctx, results, best, best_peft, adapter_dirs)
    return {"model": model_dir, "adapter": merges / best_peft, "report": report}


def write_results(
    cfg: Config, ctx: RunContext, results: dict, best: str, best_peft: str, adapter_dirs: dict[str, Path]
) -> Path:
    """merging.json (every score and path), the summary, and report.md (one table)."""
    a, b = cfg.tasks
    rows = ["base", *(f"adapter {t}" for t in cfg.tasks), *cfg.methods]
    (ctx.out_dir / "merging.json").write_text(
        json.dumps(
            {
                "metric": cfg.metric,
                "tasks": cfg.tasks,
                "results": results,
                "best": best,
                "adapters": {t: str(p) for t, p in adapter_dirs.items()},
                "merges": {m: str(ctx.out_dir / "merges" / m) for m in cfg.methods},
            },
            indent=2,
        )
    )
    ctx.summary.update(
        metric=cfg.metric,
        best=best,
        best_adapter_method=best_peft,
        best_min_kept=round(results[best]["min_kept"], 4),
        best_weights=results[best].get("weights", results[best].get("t")),
        **{f"{n.replace(' ', '_')}_{t}": round(results[n][t], 4) for n in rows for t in cfg.tasks},
    )
    table = merging.table(results, rows, cfg.tasks, best)
    head = (
        f"Two LoRA adapters (r={cfg.lora.r}, {cfg.steps} steps each) on one base, tasks {a} and {b}; "
        f"{cfg.metric} on each task's held-out rows. kept = (merge - base) / (adapter - base) on that "
        f"adapter's own task; density {cfg.density}; weights / t "
        + (
            "as given."
            if cfg.weights and cfg.t is not None
            else f"chosen on {cfg.val_fraction:g} of the training rows held out as validation."
        )
    )
    ctx.report(f"# merging\n\n{head}\n\n{table}\n")
    ctx.info(table)
    return ctx.out_dir / "report.md"
