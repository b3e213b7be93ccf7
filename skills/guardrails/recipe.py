"""Guardrails: a safety classifier in front of the model, and refusal SFT inside it, measured on held-out requests.

Story: synthetic allowed/disallowed requests (weapons, malware, self-harm, prompt injection; plain requests,
look-alikes and the world's questions), with held-out templates the training never sees -> the guard: the
backbone as AutoModelForSequenceClassification with a fresh 2-label head, trained with transformers'
Trainer, saved and reloaded -> its precision/recall on the held-out requests -> refusal SFT with TRL's
SFTTrainer (disallowed prompt -> a fixed refusal, mixed with the normal sft rows) -> held-out refusal rate
and over-refusal of four systems: the input model, the input model behind the guard, the refusal-tuned
model, and the refusal-tuned model behind the guard. The guard serves as a proxy in front of the serving
skill's backend (skills/serving `--set guard=...`, skillbook.ml.guard_proxy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from skillbook.errors import ConfigError
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
)
from skillbook.ml.posttrain import log_callback, metric_history, quiet_trainer, trl_args
from skillbook.run.blocks import BlockConfig, Logging, LoRA, Optim, Precision
from skillbook.run.runner import RunContext

OUTPUTS = {"guard": "hf-model", "model": "hf-model", "data": "dir", "report": "report"}
INPUTS = {"model": "hf-model", "guard_model": "hf-model", "data": "sft-data", "eval_data": "sft-data"}
SYSTEMS = ("input model", "input model + guard", "refusal SFT", "refusal SFT + guard")


class Config(BlockConfig):
    # --- inputs -------------------------------------------------------------------------------
    model: str = Field(
        ..., description="The model to refusal-tune and to guard: an hf-model dir (normally the sft model)."
    )
    guard_model: str | None = Field(
        None,
        description="Backbone of the safety classifier (any family with an AutoModelForSequenceClassification "
        "class); None = the input model's own backbone with a fresh 2-label head (Llama Guard's recipe, tiny).",
    )
    data: DataPath | None = Field(None, description="Normal {prompt, completion} sft rows; None = the embedded set.")
    eval_data: EvalDataPath | None = Field(
        None, description="Held-out world questions for exact match; None = data's held-out part or the embedded set."
    )
    eval_fraction: float = Field(0.1, gt=0, le=0.5, description="Share of a single data file held out.")
    # --- data -----------------------------------------------------------------------------------
    per_category: int = Field(
        60, ge=4, description="Training requests per category (held out: a quarter, from unseen templates)."
    )
    world_rows: int = Field(400, ge=0, description="Normal sft rows mixed into the refusal SFT data.")
    contrast: bool = Field(
        True, description="Also train allowed look-alikes -> a helpful opener, the counterweight to over-refusal."
    )
    # --- the guard classifier -------------------------------------------------------------------
    threshold: float = Field(0.5, gt=0, lt=1, description="Refuse when the guard's P(disallowed) >= threshold.")
    guard_steps: int = Field(150, ge=1, description="Classifier optimizer steps (full fine-tune, Trainer).")
    guard_batch_size: int = Field(16, ge=1, description="Classifier rows per step.")
    guard_lr: float = Field(5e-4, gt=0, description="Classifier peak lr (tiny full 5e-4; 1B full 1e-5).")
    # --- refusal SFT --------------------------------------------------------------------------
    method: Literal["full", "lora"] = Field(
        "full", description="full: every weight (a 1M model learns a new sentence faster); lora: an adapter, merged."
    )
    lora: LoRA = Field(LoRA(), description="The adapter (method lora).")
    steps: int = Field(120, ge=1, description="Refusal SFT optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per device per micro-batch (both trainers).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (both trainers).")
    optim: Optim = Field(
        Optim(lr=3e-3, warmup_ratio=0.05),
        description="AdamW + schedule of the refusal SFT. Tiny full 3e-3 (1e-3 leaves the refusal half-learned at "
        "60 steps); 1B-8B LoRA 1e-4.",
    )
    max_length: int = Field(128, ge=8, description="Token budget per row (prompt + completion).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (GPU memory saver).")
    seed: int = Field(0, description="Seed: data generation and order, head and adapter init.")
    precision: Precision = Field(Precision(), description="Weight dtype and mixed-precision autocast.")
    logging: Logging = Field(Logging(), description="Metric cadence and external trackers.")
    # --- evaluation ---------------------------------------------------------------------------
    eval_limit: int = Field(64, ge=1, description="Held-out world questions scored for exact match.")
    max_new_tokens: int = Field(
        12, ge=1, description="Greedy tokens per held-out prompt (the refusal's first words must fit)."
    )


def check_seq_cls(ref: str, field: str) -> None:
    """Refuse a backbone transformers has no sequence-classification class for, before anything loads."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as NAMES

    model_type = AutoConfig.from_pretrained(ref).model_type
    if model_type not in NAMES:
        raise ConfigError(
            f"{field}: {ref} is a {model_type!r} model, which has no AutoModelForSequenceClassification class in "
            f"transformers, so it cannot carry the guard's classification head; pass guard_model= a backbone "
            f"that has one (llama, mistral, qwen2, qwen3, gemma2, phi3, gpt2, ...)"
        )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    """Data, the guard, refusal SFT, the four systems measured on held-out requests.

    Long: two trainers and one measurement read best as one story."""
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from skillbook.ml import guard as g
    from skillbook.ml.evaluate import exact_match, generate_answers

    # ---- fail fast: data and both backbones are checked before anything loads or trains -------------
    world_train, world_eval = question_rows(ctx, cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed)
    world_eval = world_eval[: cfg.eval_limit]
    model_ref = resolve_model(cfg.model)
    guard_ref = resolve_model(cfg.guard_model, "guard_model") if cfg.guard_model else model_ref
    check_seq_cls(guard_ref, "guard_model" if cfg.guard_model else "model")
    if cfg.method == "lora":
        ctx.info(f"LoRA targets: {', '.join(lora_targets(model_ref, cfg.lora))}")

    # ---- data: templated requests with held-out phrasings, the refusal SFT mix ---------------------
    splits = g.guard_splits(
        [r["prompt"] for r in world_train], [r["prompt"] for r in world_eval], cfg.per_category, cfg.seed
    )
    test = splits["test"]
    sft_rows = g.refusal_sft_rows(splits["train"], world_train[: cfg.world_rows], cfg.contrast)
    data_dir = ctx.out_dir / "data"
    for name, rows in (("guard_train", splits["train"]), ("guard_test", test), ("refusal_sft", sft_rows)):
        write_jsonl(data_dir / f"{name}.jsonl", rows)
    n_bad = sum(r["label"] for r in test)
    ctx.info(
        f"guard data: {len(splits['train'])} train / {len(test)} held-out requests ({n_bad} disallowed); "
        f"refusal SFT: {len(sft_rows)} rows ({cfg.world_rows and min(cfg.world_rows, len(world_train))} normal)"
    )

    # ---- the guard: the backbone + a fresh 2-label head, fully fine-tuned with Trainer ------------
    torch.manual_seed(cfg.seed)  # the head is random: seed before creating it
    g_tok = load_tokenizer(guard_ref)
    clf = AutoModelForSequenceClassification.from_pretrained(guard_ref, num_labels=2, dtype=torch.float32)
    clf.config.pad_token_id = g_tok.pad_token_id  # the head reads the last non-pad token
    clf.config.id2label, clf.config.label2id = {0: "allowed", 1: "disallowed"}, {"allowed": 0, "disallowed": 1}
    rows = g.classifier_rows(splits["train"])
    enc = to_dataset(rows, ("text", "label")).map(
        lambda b: g_tok(b["text"], truncation=True, max_length=cfg.max_length), batched=True, remove_columns=["text"]
    )
    args = trl_args(cfg, ctx.out_dir / "guard-trainer")
    args.update(
        max_steps=cfg.guard_steps,
        per_device_train_batch_size=cfg.guard_batch_size,
        learning_rate=cfg.guard_lr,
        warmup_steps=max(1, cfg.guard_steps // 20),
        weight_decay=0.0,
    )
    trainer = Trainer(
        model=clf,
        args=TrainingArguments(**args),
        train_dataset=enc.rename_column("label", "labels"),
        data_collator=DataCollatorWithPadding(g_tok),
        processing_class=g_tok,
        callbacks=[log_callback(ctx, cfg.guard_steps)],
    )
    quiet_trainer(trainer)
    ctx.info(f"guard on {guard_ref}: {count_params(clf)[1] / 1e6:.2f} M parameters, {len(rows)} rows")
    trainer.train()
    guard_losses = metric_history(trainer, "loss")
    guard_dir = ctx.out_dir / "guard"
    if not ctx.is_main:
        return {}
    trainer.model.config.guard_threshold = cfg.threshold  # the guard proxy's default threshold
    trainer.model.save_pretrained(guard_dir)
    g_tok.save_pretrained(guard_dir)
    clf = AutoModelForSequenceClassification.from_pretrained(guard_dir).eval()  # measured as users load it
    prompts = [g.model_prompt(r) for r in test]
    scores = g.guard_scores(clf, g_tok, prompts)
    metrics = g.classifier_metrics(scores, [r["label"] for r in test], cfg.threshold)
    raw_metrics = g.classifier_metrics(
        g.guard_scores(clf, g_tok, [r["text"] for r in test]), [r["label"] for r in test], cfg.threshold
    )
    world_scores = g.guard_scores(clf, g_tok, [r["prompt"] for r in world_eval])
    ctx.info(f"guard held-out: precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}")

    # ---- the four systems on the held-out requests (and world questions) --------------------------
    def measure(model, tok) -> tuple[list[str], list[bool]]:
        gens = generate_answers(model, tok, prompts, max_new_tokens=cfg.max_new_tokens)
        return gens, exact_match(model, tok, world_eval, cfg.max_new_tokens)["correct"]

    tok = load_tokenizer(model_ref)
    base = load_causal_lm(model_ref, weights=cfg.precision.weights).eval()
    outputs: dict[str, tuple[list[str], list[bool]]] = {"input model": measure(base, tok)}
    del base

    # ---- refusal SFT: disallowed -> the refusal, mixed with the normal rows (TRL, the sft skill's way) --
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(model_ref, weights=cfg.precision.weights)
    model.generation_config.pad_token_id = tok.pad_token_id
    sft = SFTTrainer(
        model=model,
        args=SFTConfig(
            **trl_args(cfg, ctx.out_dir / "sft-trainer", max_length=cfg.max_length, completion_only_loss=True)
        ),
        processing_class=tok,
        peft_config=lora_config(cfg.lora) if cfg.method == "lora" else None,
        train_dataset=to_dataset(sft_rows, ("prompt", "completion")),
        callbacks=[log_callback(ctx, cfg.steps)],
    )
    quiet_trainer(sft)
    sft.train()
    sft_losses = metric_history(sft, "loss")
    model_dir = ctx.out_dir / "model"
    if cfg.method == "lora":
        merge_and_save(sft.model, tok, model_dir, [r["prompt"] + r["completion"] for r in sft_rows[:4]])
    else:
        sft.model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    tuned = load_causal_lm(str(model_dir), weights=cfg.precision.weights).eval()
    outputs["refusal SFT"] = measure(tuned, tok)

    # ---- guarded variants: a flagged request gets the refusal, the model never sees it ---------------
    for name in ("input model", "refusal SFT"):
        gens, correct = outputs[name]
        kept = [c and s < cfg.threshold for c, s in zip(correct, world_scores)]
        outputs[f"{name} + guard"] = (g.guarded(gens, scores, cfg.threshold), kept)
    results = {
        name: {**g.rates(outputs[name][0], test), "world_exact_match": sum(outputs[name][1]) / max(len(world_eval), 1)}
        for name in SYSTEMS
    }
    details = {
        "guard": {**metrics, "raw_text": raw_metrics, "threshold": cfg.threshold, "scores": scores},
        "systems": results,
        "generations": {name: outputs[name][0] for name in SYSTEMS},
        "losses": {"guard": guard_losses, "sft": sft_losses},
    }
    (ctx.out_dir / "guard.json").write_text(json.dumps(details, indent=2) + "\n")
    report = write_report(cfg, ctx, metrics, raw_metrics, results, test, guard_losses, sft_losses)
    return {"guard": guard_dir, "model": model_dir, "data": data_dir, "report": report}


def write_report(cfg: Config, ctx: RunContext, *parts) -> Path:
    """Summary numbers and report.md (the classifier and the four-systems tables, from ml.guard)."""
    from skillbook.ml.guard import report_lines

    summary, lines = report_lines(cfg.threshold, *parts)
    ctx.summary.update(summary)
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[4:]))
    return ctx.out_dir / "report.md"
