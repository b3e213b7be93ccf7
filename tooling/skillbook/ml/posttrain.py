"""Shared plumbing for the post-training recipes (sft, dpo, reward-modeling, grpo) on TRL + PEFT.

The recipes tell the story (data -> model -> trainer -> verify -> save); this module holds the
parts they would otherwise copy four times: reading and checking jsonl splits, resolving the
`model` input with one clear error, the LoRA config, CPU-sane TRL arguments, forwarding TRL's
logs to the run's metrics.jsonl, and merging an adapter with a logits check.
Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from skillbook.errors import ConfigError, SkillbookError

LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# Data: jsonl splits checked before any model is loaded
# ---------------------------------------------------------------------------------------------


def default_data(ctx: Any, key: str) -> Path:
    """The embedded synthetic data (written under the run dir) for `key` in write_default_data's result."""
    from skillbook.ml.synthetic import write_default_data

    return Path(write_default_data(ctx.out_dir / "data")[key])


def read_split(data_dir: Path | str, split: str, columns: tuple[str, ...], field: str) -> list[dict]:
    """Rows of `<data_dir>/<split>.jsonl`; every row must hold non-empty string `columns`.

    Raises ConfigError naming the config field, the file, the line and the missing column.
    """
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"{field}: {path} does not exist; a {field} directory needs {split}.jsonl "
            f"with one JSON object per line holding {', '.join(repr(c) for c in columns)}"
        )
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{field}: {path}:{lineno} is not valid JSON ({exc.msg})") from None
            missing = [c for c in columns if not isinstance(row, dict) or c not in row]
            if missing:
                raise ConfigError(
                    f"{field}: {path}:{lineno} has no {missing[0]!r} column; each row needs "
                    f"{', '.join(repr(c) for c in columns)}"
                )
            bad = [c for c in columns if not isinstance(row[c], str)]
            if bad:
                raise ConfigError(f"{field}: {path}:{lineno} column {bad[0]!r} must be a string")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{field}: {path} has no rows")
    return rows


def to_dataset(rows: list[dict], columns: tuple[str, ...]):
    """A datasets.Dataset holding only `columns` (extra keys such as 'kind' would confuse TRL's format sniffing)."""
    from datasets import Dataset

    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns})


# ---------------------------------------------------------------------------------------------
# Model: one clear error for a bad reference, then the ecosystem's loaders
# ---------------------------------------------------------------------------------------------


def resolve_model(ref: str | Path, field: str = "model") -> str:
    """A loadable model reference: a local hf-model dir, or a hub id reachable now. Fails fast otherwise."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{field}: {path} is not a Hugging Face model directory (no config.json); pass the "
                f"'model' output of a pretraining/sft run or a save_pretrained directory"
            )
        return str(path)
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if looks_local or offline:
        why = "no such directory" if looks_local else "no such directory, and HF_HUB_OFFLINE=1 forbids the hub"
        raise ConfigError(
            f"{field}: {ref!r} cannot be loaded ({why}); pass a local hf-model directory, "
            f"e.g. the 'model' output of `skills run pretraining`"
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(ref)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many classes; all mean the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{field}: {ref!r} is neither a local directory nor a reachable hub model ({first[:160]}); "
            f"pass a local hf-model directory"
        ) from None
    return ref


def quiet_progress_bars() -> None:
    """Per-map and per-shard progress bars from datasets/transformers drown the run's own log lines."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(ref: str):
    """The model's tokenizer with a pad token (TRL pads batches; fall back to eos, as most chat models do)."""
    from transformers import AutoTokenizer

    quiet_progress_bars()

    tok = AutoTokenizer.from_pretrained(ref)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise SkillbookError(
            f"model: the tokenizer in {ref} has no eos token; post-training needs one so the "
            f"model learns where an answer ends"
        )
    return tok


def load_causal_lm(ref: str, quantization: str = "none", dtype: str = "auto"):
    """AutoModelForCausalLM in float32 on CPU; bf16 or 4-bit (QLoRA, needs CUDA + bitsandbytes) when asked."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    cuda = torch.cuda.is_available()
    torch_dtype = {
        "auto": torch.bfloat16 if cuda else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }[dtype]
    kwargs["dtype"] = torch_dtype
    if quantization == "4bit":
        if not cuda:
            raise ConfigError(
                "quantization: '4bit' (QLoRA) needs a CUDA GPU and bitsandbytes; use quantization: none on CPU"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return AutoModelForCausalLM.from_pretrained(ref, **kwargs)


def lora_config(r: int, alpha: int, dropout: float, targets: list[str], task_type: str = "CAUSAL_LM"):
    """A PEFT LoraConfig; `targets` are module-name suffixes (Llama-style names by default)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type=task_type, bias="none"
    )


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# TRL arguments and logging
# ---------------------------------------------------------------------------------------------


def trl_args(
    out_dir: Path,
    *,
    steps: int,
    batch_size: int,
    grad_accum: int,
    lr: float,
    warmup_ratio: float,
    seed: int,
    gradient_checkpointing: bool,
    logging_steps: int = 5,
    **extra: Any,
) -> dict:
    """Keyword arguments shared by SFTConfig/DPOConfig/RewardConfig/GRPOConfig.

    TRL turns on gradient checkpointing and bf16 by default, and SFTConfig refuses bf16 on a CPU:
    on a tiny CPU run both only cost time, so precision follows the device and checkpointing the config.
    """
    import torch

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return dict(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(0, math.ceil(warmup_ratio * steps)),
        weight_decay=0.0,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
        bf16=bf16,
        use_cpu=not cuda,
        logging_steps=logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


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


def metric_history(trainer: Any, key: str) -> list[float]:
    """Values of `key` in the trainer's log history, in order."""
    return [float(h[key]) for h in trainer.state.log_history if key in h]


# ---------------------------------------------------------------------------------------------
# Save: adapter, merged model (verified), tokenizer next to it
# ---------------------------------------------------------------------------------------------


def probe_batch(tok, texts: list[str]):
    """A padded batch of a few real prompts to compare logits on."""
    return tok(texts, return_tensors="pt", padding=True)


def merge_and_save(peft_model, tok, out_dir: Path, probe_texts: list[str], atol: float = 1e-4) -> float:
    """Merge LoRA weights into the base, save model + tokenizer, reload and check logits match.

    Returns the largest absolute logit difference between the adapter model and the reloaded
    merged model; raises SkillbookError if it exceeds `atol` (a merge that changes outputs is a bug).
    """
    import torch
    from transformers import AutoModelForCausalLM

    peft_model.eval()
    batch = probe_batch(tok, probe_texts)
    batch = {k: v.to(peft_model.device) for k, v in batch.items()}
    with torch.no_grad():
        before = peft_model(**batch).logits.float().cpu()
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=merged.dtype).to(merged.device).eval()
    with torch.no_grad():
        after = reloaded(**batch).logits.float().cpu()
    mask = batch["attention_mask"].bool().cpu()
    diff = (before - after).abs()[mask].max().item()
    tol = atol if merged.dtype == torch.float32 else 5e-2  # bf16 rounding after merge is ~1e-2
    if not diff <= tol:
        raise SkillbookError(
            f"merged model logits differ from adapter logits by {diff:.3g} (> {tol}); "
            f"the merge in {out_dir} is not faithful"
        )
    return diff


# ---------------------------------------------------------------------------------------------
# Small pieces the recipes share
# ---------------------------------------------------------------------------------------------


def question_dirs(ctx: Any, data: str | None, eval_data: str | None) -> tuple[Path, Path]:
    """(train dir, held-out dir) of prompt/completion data: the embedded sets when `data` is None,
    else `data` with `eval_data` (or `data`'s own test split) for the held-out rows."""
    if data is None:
        return default_data(ctx, "sft_data"), Path(eval_data) if eval_data else default_data(ctx, "eval_data")
    data_dir = artifact_dir(data, "data")
    return data_dir, Path(eval_data) if eval_data else data_dir


def artifact_dir(ref: str | Path, field: str) -> Path:
    """An existing input directory, or ConfigError naming the field."""
    from skillbook.run.recipe import artifact_path

    path = artifact_path(ref, field)
    if not path.is_dir():
        raise ConfigError(f"{field}: {path} is a file; pass the directory that holds train.jsonl/test.jsonl")
    return path


def render_chat(tok, rows: list[dict]) -> list[dict]:
    """Rows rendered as one user turn + the assistant's answer, the way the chat template writes them.

    The template already writes bos; the tokenizer adds another when it encodes the string, so the
    rendered bos is dropped here (a doubled bos is a classic silent chat-template bug).
    """
    out = []
    for row in rows:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        if tok.bos_token and prompt.startswith(tok.bos_token) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
            prompt = prompt[len(tok.bos_token) :]
        new = {**row, "prompt": prompt}
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                new[key] = row[key].strip()
        out.append(new)
    return out


def reload_adapter_bf16(base_ref: str, adapter_dir: Path):
    """Base in bf16 + the saved adapter: the faithful way to merge a QLoRA adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=torch.bfloat16)
    return PeftModel.from_pretrained(base, adapter_dir)


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


def reward_scores(model, tok, texts: list[str], batch_size: int = 32) -> list[float]:
    """Scalar rewards of a num_labels=1 sequence classifier for each text (read at the last real token)."""
    import torch

    model.eval()
    scores: list[float] = []
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i : i + batch_size], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            scores += model(**batch).logits[:, 0].float().tolist()
    return scores


def pairwise_accuracy(model, tok, rows: list[dict]) -> tuple[float, float]:
    """(fraction of pairs with r(prompt+chosen) > r(prompt+rejected), mean reward margin).

    Texts end in eos, as TRL's RewardTrainer trains them: the score is read where it was learned.
    """
    eos = tok.eos_token or ""
    chosen = reward_scores(model, tok, [r["prompt"] + r["chosen"] + eos for r in rows])
    rejected = reward_scores(model, tok, [r["prompt"] + r["rejected"] + eos for r in rows])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def answer_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's first line, normalised, is exactly the answer (a verifiable reward)."""
    from skillbook.ml.evaluate import normalize

    lines = completion.strip().splitlines()
    return float(bool(lines) and normalize(lines[0]) == normalize(answer) != "")


def mean_sampled_reward(
    model, tok, rows: list[dict], samples: int, max_new_tokens: int, temperature: float, seed: int
) -> float:
    """Mean answer_reward over `samples` sampled answers per row (seeded, so before/after are comparable)."""
    from skillbook.ml.evaluate import generate_answers

    prompts = [r["prompt"] for r in rows for _ in range(samples)]
    answers = [r["completion"] for r in rows for _ in range(samples)]
    outs = generate_answers(
        model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=64
    )
    return sum(answer_reward(o, a) for o, a in zip(outs, answers)) / len(outs)
