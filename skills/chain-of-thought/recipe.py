"""Chain-of-thought SFT: fine-tune one start model twice on the same multi-step problems, once on worked steps
and once on bare answers, and measure held-out exact match by number of steps for direct answers, greedy CoT
and CoT + self-consistency (majority vote over sampled chains).

Story: the problems (skillbook.ml.synthetic_reasoning: 1-3 step arithmetic and fact chains, a test split
never seen in training) -> the start model (trained with the pretraining skill when not given) -> check the
longest worked answer fits max_length -> two full fine-tunes with TRL's SFTTrainer from the same weights,
same rows, same order, same steps: completions " Step 1: ... So the answer is 5." vs " 5" -> both saved ->
reloaded with AutoModelForCausalLM -> exact match by steps: direct (greedy), CoT (greedy), CoT +
self-consistency (num_samples chains at temperature, vote on the extracted answers) -> report.md.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from skillbook.errors import ConfigError
from skillbook.ml.data_files import DataPath
from skillbook.run.blocks import BlockConfig, Logging, Optim, Precision
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "hf-model", "direct_model": "hf-model", "report": "report"}
INPUTS = {"model": "hf-model", "data": "sft-data"}
MODES = ("direct", "cot")


class Config(BlockConfig):
    """The defaults are the CPU-tiny run: the pretraining default (0.98M params) fine-tuned twice, 500 steps
    x 16 problems each, 120 held-out problems scored three ways; about two and a half minutes on 2 cores."""

    model: str | None = Field(
        None,
        description="Start model: an hf-model dir (tokenizer inside; e.g. the pretraining skill's 'model' output) "
        "or a hub id when online; None = train the pretraining default (on the same synthetic world) first.",
    )
    data: DataPath | None = Field(
        None,
        description="Your problems instead of the embedded ones: rows {prompt, cot, answer} (+ optional steps, "
        "kind), cot ending in 'So the answer is X.'; a file (split by test_fraction) or a folder with "
        "train/test. None = the synthetic multi-step problems.",
    )
    pretrain: dict[str, Any] = Field(
        default_factory=dict, description="pretraining overrides when model is None (e.g. {max_steps: 600})."
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each (kind, steps) stratum of problems held out from training."
    )
    max_per_stratum: int = Field(
        1000,
        ge=5,
        description="At most this many problems per (kind, steps) stratum before the split (1000: the 2- and "
        "3-step sums are too many to memorise, so the steps must be learned; 400 gave worse arithmetic).",
    )
    steps: int = Field(
        500,
        ge=1,
        description="Optimizer steps of each fine-tune (the same for both); at 300 whether the chains hold "
        "depends on the start model's last digits.",
    )
    batch_size: int = Field(16, ge=1, description="Problems per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optim: Optim = Field(
        Optim(lr=2e-3, warmup_ratio=0.05),
        description="AdamW + schedule of both fine-tunes. lr 2e-3 for a full fine-tune at 1M params; 1e-5 to "
        "2e-5 at 0.5-1B.",
    )
    max_length: int = Field(
        96, ge=16, description="Token budget per prompt + completion; the longest worked answer must fit."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: saves GPU memory, costs ~30% time; off on CPU."
    )
    precision: Precision = Field(Precision(), description="Weight dtype and mixed-precision autocast.")
    logging: Logging = Field(Logging(), description="Metric cadence and external trackers.")
    eval_per_stratum: int = Field(
        20, ge=0, description="Held-out problems scored per (kind, steps) stratum (6 strata); 0 = skip scoring."
    )
    num_samples: int = Field(
        5, ge=1, description="Self-consistency: sampled chains per problem whose answers are majority-voted."
    )
    temperature: float = Field(0.7, gt=0, description="Sampling temperature of the self-consistency chains.")
    eval_batch_size: int = Field(32, ge=1, description="Prompts per generate() batch when scoring.")
    seed: int = Field(0, description="Seed: the problems, their split, data order and sampling.")


def start_model(cfg: Config, ctx: RunContext) -> str:
    """The given model (checked), or the pretraining default trained into run_dir/start/."""
    from skillbook.ml.hf_models import resolve_model

    if cfg.model:
        return resolve_model(cfg.model)
    res = ctx.run_skill("pretraining", {"seed": cfg.seed, **cfg.pretrain})
    src, dest = ctx.out_dir / "pretraining", ctx.out_dir / "start"
    rel = Path(res["outputs"]["model"]["path"]).relative_to(src)
    shutil.rmtree(dest, ignore_errors=True)
    src.rename(dest)
    ctx.info(f"trained the start model ({res['summary']['params'] / 1e6:.2f}M params) into {dest}")
    return str(dest / rel)


def check_fits(cfg: Config, tok: Any, model_config: Any, rows: list[dict]) -> int:
    """Tokens of the longest worked answer; refuses a max_length (or a model context) it does not fit."""
    longest = max(len(tok(r["prompt"] + r["cot"])["input_ids"]) for r in rows) + 1  # + eos
    if longest > cfg.max_length:
        raise ConfigError(
            f"max_length: {cfg.max_length} tokens cut the longest worked answer ({longest} tokens with its "
            f"prompt); raise max_length to {longest} or more"
        )
    n_ctx = getattr(model_config, "max_position_embeddings", None) or cfg.max_length
    if cfg.max_length > n_ctx:
        raise ConfigError(f"max_length: {cfg.max_length} exceeds the model's context ({n_ctx}); lower max_length")
    return max(len(tok(r["cot"], add_special_tokens=False)["input_ids"]) for r in rows)


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    """Data, start model, two fine-tunes, three ways of answering, report.

    Long: the two fine-tunes share the loop, the rows and the start model, so they read best in one place."""
    import torch
    from transformers import AutoConfig
    from trl import SFTConfig, SFTTrainer

    from skillbook.ml import synthetic_reasoning as sr
    from skillbook.ml.data_files import load_splits
    from skillbook.ml.finetune_data import to_dataset
    from skillbook.ml.hf_models import count_params, load_causal_lm, load_tokenizer
    from skillbook.ml.posttrain import log_callback, metric_history, precision_name, quiet_trainer, trl_args

    # ---- problems: the same train rows for both fine-tunes, a held-out set neither sees ------------------
    if cfg.data is None:
        data = sr.generate(cfg.seed, cfg.test_fraction, cfg.max_per_stratum)
    else:
        got = load_splits(
            cfg.data, "data", ("prompt", "cot", "answer"), cfg.test_fraction, cfg.seed, fraction_name="test_fraction"
        )
        ctx.info(got.note)
        data = {"train": sr.from_user_rows(got.train), "test": sr.from_user_rows(got.held)}
    train_rows, held = data["train"], sr.balanced(data["test"], cfg.eval_per_stratum)
    ctx.info(
        f"{len(train_rows)} train problems, {len(data['test'])} held out ({len(held)} scored: "
        f"{cfg.eval_per_stratum} per kind x steps)"
    )

    # ---- start model; the longest worked answer must fit, checked before anything trains -----------------
    model_ref = start_model(cfg, ctx)
    tok = load_tokenizer(model_ref)
    cot_tokens = check_fits(cfg, tok, AutoConfig.from_pretrained(model_ref), train_rows + data["test"])
    ctx.info(f"start model {model_ref}; longest worked answer {cot_tokens} tokens")

    # ---- two full fine-tunes, identical but for the completion ---------------------------------------------
    out: dict[str, Path] = {}
    hist: dict[str, dict] = {}
    for mode in MODES:
        t0 = time.time()
        torch.manual_seed(cfg.seed)
        model = load_causal_lm(model_ref, weights=cfg.precision.weights)
        model.generation_config.pad_token_id = tok.pad_token_id
        rows = [{"prompt": r["prompt"], "completion": r[mode]} for r in train_rows]
        args = SFTConfig(
            **trl_args(cfg, ctx.out_dir / f"trainer-{mode}", max_length=cfg.max_length, completion_only_loss=True)
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            processing_class=tok,
            train_dataset=to_dataset(rows, ("prompt", "completion")),
            callbacks=[log_callback(ctx, cfg.steps)],
        )
        quiet_trainer(trainer)
        ctx.info(f"{mode}: full fine-tune of {count_params(model)[1]:,} parameters, {precision_name(args)}")
        trainer.train()
        losses = metric_history(trainer, "loss") or [float("nan")]  # none logged when steps < logging.every
        hist[mode] = {"loss_first": losses[0], "loss_last": losses[-1], "seconds": time.time() - t0}
        out["model" if mode == "cot" else "direct_model"] = path = ctx.out_dir / mode
        if ctx.is_main:
            trainer.model.save_pretrained(path)
            tok.save_pretrained(path)
        del trainer, model
    if not ctx.is_main:
        return {}

    # ---- score the saved models, reloaded as a user loads them ---------------------------------------------
    scores: dict[str, dict] = {}
    if held:
        t0 = time.time()
        gen = {"max_new_tokens": cot_tokens + 4, "batch_size": cfg.eval_batch_size, "seed": cfg.seed}
        scores["direct"] = sr.score(out["direct_model"], held, "direct", {**gen, "max_new_tokens": 8})
        scores["cot"] = sr.score(out["model"], held, "cot", gen)
        scores["cot_sc"] = sr.score(
            out["model"], held, "cot", {**gen, "num_samples": cfg.num_samples, "temperature": cfg.temperature}
        )
        ctx.info(f"scored {len(held)} held-out problems three ways in {time.time() - t0:.0f}s")
    out["report"] = write_results(cfg, ctx, hist, scores, len(train_rows), held)
    return out


LABELS = {
    "direct": "direct (SFT on bare answers, greedy)",
    "cot": "CoT (SFT on worked steps, greedy)",
    "cot_sc": "CoT + self-consistency",
}


def write_results(cfg: Config, ctx: RunContext, hist: dict, scores: dict, n_train: int, held: list[dict]) -> Path:
    """Summary keys (<method>_em_<steps>, <method>_em_multi, losses) and report.md's table by steps."""
    n_held, three = len(held), "3 steps" if max((r["steps"] for r in held), default=3) <= 3 else "3+ steps"
    for mode, h in hist.items():
        ctx.summary.update(
            {f"{mode}_loss_first": round(h["loss_first"], 4), f"{mode}_loss_last": round(h["loss_last"], 4)}
        )
        ctx.summary[f"{mode}_train_seconds"] = round(h["seconds"], 1)
    for name, s in scores.items():
        ctx.summary.update({f"{name}_em_{k}": round(v, 4) for k, v in s["by_steps"].items()})
        ctx.summary.update({f"{name}_em_{k}": round(s[k], 4) for k in ("all", "multi")})
    if "cot" in scores:
        ctx.summary["cot_steps_correct"] = round(scores["cot"]["steps_correct"], 4)
    ctx.summary.update(train_problems=n_train, held_out_scored=n_held, num_samples=cfg.num_samples)
    lines = [
        "# chain-of-thought",
        "",
        f"One start model fine-tuned twice on the same {n_train} problems ({cfg.steps} steps x {cfg.batch_size}, "
        f"lr {cfg.optim.lr}): on worked steps (CoT) and on bare answers (direct). Held-out exact match on "
        f"{n_held} problems never seen in training ({cfg.eval_per_stratum} per kind x steps); "
        f"self-consistency = majority vote over {cfg.num_samples} chains at T = {cfg.temperature}.",
        "",
        f"| method | 1 step | 2 steps | {three} | multi-step (2+) | all |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in scores.items():
        b = s["by_steps"]
        lines.append(
            f"| {LABELS[name]} | {b.get(1, 0):.3f} | {b.get(2, 0):.3f} | {b.get(3, 0):.3f} | "
            f"{s['multi']:.3f} | {s['all']:.3f} |"
        )
    if scores:
        lines += ["", f"| method | kind | 1 step | 2 steps | {three} |", "|---|---|---:|---:|---:|"]
        for name, s in scores.items():
            for kind, b in s["by_kind"].items():
                lines.append(f"| {name} | {kind} | " + " | ".join(f"{b.get(k, 0):.3f}" for k in (1, 2, 3)) + " |")
        lines += [
            "",
            f"Greedy CoT writes every worked step of the reference on {scores['cot']['steps_correct']:.3f} of the "
            "problems. Samples (greedy CoT):",
            "",
        ]
        lines += [
            f"- `{s['prompt']!r}` -> `{s['generation']!r}` (expected {s['answer']})" for s in scores["cot"]["samples"]
        ]
    lines += [
        "",
        "Train loss first -> last: "
        + ", ".join(f"{m} {h['loss_first']:.3f} -> {h['loss_last']:.3f}" for m, h in hist.items()),
    ]
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[4:]))
    return ctx.out_dir / "report.md"
