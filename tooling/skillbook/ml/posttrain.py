"""TRL glue shared by the post-training recipes (sft, dpo, reward-modeling, grpo).

The recipes tell the story (data -> model -> trainer -> verify -> save); this module turns their
config blocks (Optim, Precision, Logging) into the arguments every TRL *Config takes, forwards
TRL's logs to the run's metrics.jsonl, silences transformers' console printers, and writes the
short report. Data lives in ml.finetune_data, models and adapters in ml.hf_models.
Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from skillbook.errors import ConfigError
from skillbook.run.blocks import Logging, Optim, Precision


class TrainerConfig(Protocol):
    """The part of a post-training Config that trl_args reads."""

    steps: int
    batch_size: int
    grad_accum: int
    seed: int
    gradient_checkpointing: bool
    optim: Optim
    precision: Precision
    logging: Logging


def precision_flags(precision: Precision) -> dict[str, bool]:
    """TRL's bf16/fp16 flags for Precision.dtype.

    auto = bf16 on a CUDA GPU that supports it, else fp32: TRL itself would turn bf16 on even on a CPU,
    where a tiny run only pays for it in time.
    """
    import torch

    cuda = torch.cuda.is_available()
    dtype = precision.dtype
    if dtype == "auto":
        dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and not cuda:
        raise ConfigError("precision.dtype: float16 mixed precision needs a CUDA GPU; use auto or float32 on CPU")
    return {"bf16": dtype == "bfloat16", "fp16": dtype == "float16"}


def trl_args(cfg: TrainerConfig, out_dir: Path, **extra: Any) -> dict:
    """Keyword arguments shared by SFTConfig/DPOConfig/RewardConfig/GRPOConfig, from `cfg`'s fields and
    blocks; `extra` holds what only one trainer takes (max_length, beta, ...).

    Every choice a user may want is a block field; what is fixed here is plumbing the run needs:
    no checkpoints or eval loops (the recipe saves and measures itself), no tqdm (the run has its own
    progress bar), no dataloader workers (2 CPU cores), the CPU when there is no GPU.
    """
    import torch

    optim = cfg.optim
    return dict(
        output_dir=str(out_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=optim.lr,
        lr_scheduler_type=optim.schedule,
        warmup_steps=max(0, math.ceil(optim.warmup_ratio * cfg.steps)),
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        max_grad_norm=optim.grad_clip,
        seed=cfg.seed,
        # TRL turns checkpointing on by default; on a tiny CPU run it only costs time, so the config decides
        gradient_checkpointing=cfg.gradient_checkpointing,
        **precision_flags(cfg.precision),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=cfg.logging.every,
        report_to=list(cfg.logging.report_to),
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def precision_name(args: Any) -> str:
    """bf16, fp16 or fp32: the mixed precision a TRL args object will train in (for the log line)."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def log_callback(ctx: Any, total_steps: int):
    """A TrainerCallback that sends TRL's logged metrics to ctx.log (metrics.jsonl + progress bar)."""
    from transformers import TrainerCallback

    class _ToRunContext(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ctx.progress(total_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            clean = {
                k.replace("/", "_"): float(v)
                for k, v in (logs or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if clean:
                ctx.log(step=state.global_step, **clean)

    return _ToRunContext()


def quiet_trainer(trainer: Any) -> Any:
    """Drop transformers' console printers: with tqdm off, PrinterCallback prints every log dict to
    stdout, which would corrupt `skills run --json`; the run's own log_callback records them instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def sharded(trainer: Any) -> bool:
    """True when FSDP or DeepSpeed (from `--launcher accelerate --accelerate-config`) shards the trained model:
    rank 0 then holds only a shard, so merging or evaluating starts from what finish_training saved."""
    return bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)


def finish_training(trainer: Any, ctx: Any, save_to: Path | None) -> bool:
    """After trainer.train(), on every rank: save the trained model (a PeftModel saves its adapter) and the
    trainer's tokenizer to `save_to`, record the process layout; True on rank 0, which goes on alone.

    Every rank must call it: under FSDP or DeepSpeed ZeRO-3 the save gathers the shards (a collective),
    and Trainer.save_model writes on the main process only. After it no rank runs a collective again, so
    the other ranks return their output paths while rank 0 merges, measures and writes the report.
    """
    args = trainer.args
    if save_to is not None:
        if trainer.is_fsdp_enabled:  # a sharded state dict would leave no loadable model in save_to
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(save_to))
        if ctx.is_main:  # the run's config.yaml records the run; keep the artifact what save_pretrained writes
            (Path(save_to) / "training_args.bin").unlink(missing_ok=True)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    ctx.summary.update(world_size=args.world_size, global_batch=global_batch)
    ctx.info(
        f"trained on {args.world_size} process(es) ({trainer.accelerator.distributed_type.value}), "
        f"{global_batch} sequences per optimizer step"
    )
    return bool(ctx.is_main)


def metric_history(trainer: Any, key: str) -> list[float]:
    """Values of `key` in the trainer's log history, in order."""
    return [float(h[key]) for h in trainer.state.log_history if key in h]


def report_md(title: str, method: str, model_ref: str, summary: dict, losses: list[float]) -> str:
    """A short report.md: what was trained, the before/after numbers, the loss curve in numbers."""
    lines = [
        f"# {title} run",
        "",
        f"Base model: `{model_ref}`  ",
        f"Method: `{method}`",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in summary.items():
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if losses:
        picks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
        lines += ["", "Training loss at logged points: " + ", ".join(f"{losses[i]:.3f}" for i in picks)]
    return "\n".join(lines) + "\n"
