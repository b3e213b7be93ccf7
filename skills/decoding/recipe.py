"""Decoding strategies side by side: greedy, beam search, temperature, top-k, top-p, min-p, repetition
penalty and self-consistency, each through transformers' `generate`, on the same held-out questions.

Story: check the inputs -> load the model once -> for each strategy, one GenerationConfig and one
generate pass over the questions -> exact match (first answer words) and distinct-1/2 (diversity over
the generations) per strategy -> self-consistency: N samples per question, majority vote on the
normalized answer, against greedy -> decoding.json, one table in report.md and in the summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from skillbook.errors import ConfigError
from skillbook.ml.data_files import EvalDataPath
from skillbook.run.recipe import RecipeConfig
from skillbook.run.runner import RunContext

OUTPUTS = {"report": "report"}
INPUTS = {"model": "hf-model", "eval_data": "sft-data"}

Strategy = Literal["greedy", "beam", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "self_consistency"]
ALL: list[Strategy] = [
    "greedy",
    "beam",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "self_consistency",
]


class Config(RecipeConfig):
    # ---- what to decode with, on what
    model: str = Field(
        ...,
        description="A causal LM: an hf-model dir (save_pretrained, tokenizer inside; e.g. the sft skill's "
        "'model' output) or a hub id when online.",
    )
    eval_data: EvalDataPath | None = Field(
        None,
        description="Held-out {prompt, completion} rows: a .jsonl/.json/.parquet file (every row) or a folder "
        "(its test.jsonl, or eval/validation); None = the embedded world's held-out questions.",
    )
    max_questions: int = Field(64, ge=1, description="The first N held-out questions (same N for every strategy).")
    chat_template: bool = Field(
        False, description="Render prompts with the tokenizer's chat template; must match how the model was tuned."
    )
    strategies: list[Strategy] = Field(
        ALL, min_length=1, description="Strategies to compare, in table order (greedy is always measured too)."
    )
    # ---- the knobs of each strategy
    max_new_tokens: int = Field(12, ge=1, description="New tokens per generation (answers are 1-3 words).")
    num_beams: int = Field(4, ge=2, description="beam: beams kept per step.")
    length_penalty: float = Field(
        0.0,
        description="beam: finished beams rank by sum log p / length^this. 0 = the most likely sequence; "
        "transformers' default 1.0 prefers longer ones (less likely in total).",
    )
    temperature: float = Field(
        0.7, gt=0, description="temperature and self_consistency: logits / T before sampling (<1 sharpens)."
    )
    top_k: int = Field(10, ge=1, description="top_k: sample among the k most likely tokens (1 = greedy), at T=1.")
    top_p: float = Field(0.9, gt=0, le=1, description="top_p: sample from the smallest set with mass >= p, at T=1.")
    min_p: float = Field(
        0.1, gt=0, le=1, description="min_p: keep tokens with p >= min_p x p(most likely token), at T=1."
    )
    repetition_penalty: float = Field(
        1.3, gt=0, description="repetition_penalty: greedy with seen tokens' logits divided by this (>1 penalises)."
    )
    num_samples: int = Field(
        8,
        ge=2,
        description="Samples per question of every sampling strategy (mean exact match, diversity) and of "
        "self_consistency's majority vote.",
    )
    batch_size: int = Field(32, ge=1, description="Questions per generate call.")
    weights: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weight dtype: auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto = cuda when available.")
    seed: int = Field(0, description="Seed of every sampling strategy (each restarts from it).")

    @field_validator("model")
    @classmethod
    def _model_dir(cls, value: str) -> str:
        """A directory that exists must be a saved model; a missing one is the runner's input check."""
        path = Path(value).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; pass an hf-model dir (e.g. the sft skill's 'model' output)")
        return value


def settings(cfg: Config, strategy: str) -> dict[str, Any]:
    """The GenerationConfig keywords of one strategy; transformers' logits processors do the rest."""
    table: dict[str, dict[str, Any]] = {
        "greedy": {"do_sample": False},
        "beam": {"do_sample": False, "num_beams": cfg.num_beams, "length_penalty": cfg.length_penalty},
        "temperature": {"do_sample": True, "temperature": cfg.temperature},
        "top_k": {"do_sample": True, "top_k": cfg.top_k},
        "top_p": {"do_sample": True, "top_p": cfg.top_p},
        "min_p": {"do_sample": True, "min_p": cfg.min_p},
        "repetition_penalty": {"do_sample": False, "repetition_penalty": cfg.repetition_penalty},
        "self_consistency": {"do_sample": True, "temperature": cfg.temperature},
    }
    return table[strategy]


def score(name: str, samples: list[list[str]], questions: list[dict], num_samples: int, tok: Any) -> tuple[dict, list]:
    """One table row (exact match, distinct-1/2, answers per question) and each question's answer."""
    from skillbook.ml import decoding as dec
    from skillbook.ml.evaluate import answer_matches

    n = len(samples[0])
    row: dict[str, Any] = {"strategy": name}
    if name == "self_consistency":  # the answer is the majority of the N samples
        votes = [dec.majority_vote(s) for s in samples]
        answers = [v[0] for v in votes]
        correct = [float(answer_matches(a, q["completion"])) for a, q in zip(answers, questions)]
        row["agreement"] = sum(v[1] for v in votes) / len(votes)  # mean share of samples behind the winner
    else:
        answers = [s[0] for s in samples]
        correct = [sum(answer_matches(t, q["completion"]) for t in s) / n for s, q in zip(samples, questions)]
    every = [tok.tokenize(text) for s in samples for text in s] * (num_samples // n)
    row.update(
        exact_match=sum(correct) / len(questions),
        distinct_1=dec.distinct_n(every, 1),
        distinct_2=dec.distinct_n(every, 2),
        answers_per_question=sum(dec.distinct_answers(s) for s in samples) / len(samples),
    )
    return row, answers


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    t_start = time.time()
    # ---- inputs: every path checked before a model loads ------------------------------------------
    from skillbook.ml.data_files import read_rows
    from skillbook.ml.finetune_data import QA, default_data, held_out_rows
    from skillbook.ml.hf_models import resolve_model

    model_ref = resolve_model(cfg.model)
    if cfg.eval_data is None:
        held = read_rows(default_data(ctx, "eval_data") / "test.jsonl", "eval_data", QA)
    else:
        held = held_out_rows(ctx, cfg.eval_data, "eval_data")
    questions = held[: cfg.max_questions]  # the first N, so two runs (and every strategy) see the same ones
    strategies = ["greedy", *[s for s in dict.fromkeys(cfg.strategies) if s != "greedy"]]
    device = ctx.setup_device(cfg.device)
    out = ctx.out_dir / "decoding.json"
    if not ctx.is_main:  # decoding is one process's job: under torchrun rank 0 decodes, the others return
        return {"report": out}

    # ---- the model, once -------------------------------------------------------------------------
    from skillbook.ml import decoding as dec
    from skillbook.ml.hf_models import count_params, load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_ref)
    model = load_causal_lm(model_ref, weights=cfg.weights).to(device).eval()
    if cfg.chat_template:  # the rendering the model was tuned on, or exact match measures a format mismatch
        from skillbook.ml.finetune_data import render_chat

        if not tok.chat_template:
            raise ConfigError(f"chat_template: the tokenizer of {model_ref} has no chat template; set it false")
        questions = render_chat(tok, questions)
    prompts = [q["prompt"] for q in questions]
    ctx.info(
        f"{model_ref}: {count_params(model)[1] / 1e6:.2f} M parameters on {device} ({model.dtype}); "
        f"{len(questions)} held-out questions, strategies {', '.join(strategies)}"
    )
    ctx.progress(len(strategies), "decoding")

    # ---- one generate pass per strategy; exact match and diversity of what it wrote ---------------
    # A sampling strategy draws num_samples answers per question: its exact match is their mean (a steadier
    # estimate than one draw) and its diversity is measured across them. A deterministic one (greedy, beam,
    # repetition penalty) writes the same answer every time, so its one generation stands for all N.
    rows, generations, drawn = [], {}, {}
    for step, name in enumerate(strategies, 1):
        t0 = time.time()
        knobs = settings(cfg, name)
        n = cfg.num_samples if knobs["do_sample"] else 1
        key = json.dumps(knobs, sort_keys=True)
        if key not in drawn:  # self_consistency votes over exactly the samples `temperature` drew
            gen_cfg = dec.generation_config(tok, cfg.max_new_tokens, num_return_sequences=n, **knobs)
            drawn[key] = dec.generate_texts(model, tok, prompts, gen_cfg, cfg.batch_size, cfg.seed)
        row, answers = score(name, drawn[key], questions, cfg.num_samples, tok)
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
        generations[name] = answers
        ctx.log(step=step, **row)
        ctx.info(
            f"{name:<18} exact match {row['exact_match']:.3f}  distinct-1 {row['distinct_1']:.3f}  "
            f"distinct-2 {row['distinct_2']:.3f}  answers/question {row['answers_per_question']:.2f}  "
            f"({row['seconds']:.1f} s)"
        )

    # ---- outputs: decoding.json, the summary and report.md carry the same table ----------------------
    by_name = {r["strategy"]: r for r in rows}
    for r in rows:
        for key in ("exact_match", "distinct_1", "distinct_2", "answers_per_question"):
            ctx.summary[f"{r['strategy']}_{key}"] = r[key]
    if "self_consistency" in by_name:
        sc = by_name["self_consistency"]
        ctx.summary["self_consistency_gain"] = sc["exact_match"] - by_name["greedy"]["exact_match"]
        ctx.summary["self_consistency_agreement"] = sc["agreement"]
        ctx.info(
            f"self-consistency ({cfg.num_samples} samples at T={cfg.temperature}, majority vote): exact match "
            f"{sc['exact_match']:.3f} vs greedy {by_name['greedy']['exact_match']:.3f}"
        )
    ctx.summary.update(n_questions=len(questions), seconds=round(time.time() - t_start, 2))
    report = {
        "model": cfg.model,
        "n_questions": len(questions),
        "table": rows,
        "settings": {name: settings(cfg, name) for name in strategies},
        "max_new_tokens": cfg.max_new_tokens,
        "num_samples": cfg.num_samples,
        "generations": generations,
        "expected": [q["completion"] for q in questions],
        "prompts": prompts,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    ctx.report(render_report(report))
    return {"report": out}


def render_report(r: dict) -> str:
    """report.md: the one strategy table, then a few questions with each strategy's answer."""
    lines = [
        f"# Decoding strategies on `{r['model']}`",
        "",
        f"{r['n_questions']} held-out questions, {r['max_new_tokens']} new tokens each, {r['num_samples']} samples "
        "per question for the sampling strategies. Exact match: the answer's first words equal the expected ones "
        "(mean over the samples; self-consistency: of their majority vote). distinct-n: unique token n-grams / all "
        "n-grams over the samples of every question (a deterministic strategy repeats its one answer). Answers / "
        "question: different normalized answers among a question's samples.",
        "",
        "| strategy | settings | exact match | distinct-1 | distinct-2 | answers / question | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["table"]:
        knobs = ", ".join(f"{k}={v}" for k, v in r["settings"][row["strategy"]].items() if k != "do_sample")
        if row["strategy"] == "self_consistency":
            knobs += f", majority of {r['num_samples']}"
        lines.append(
            f"| {row['strategy']} | {knobs or '-'} | {row['exact_match']:.3f} | {row['distinct_1']:.3f} | "
            f"{row['distinct_2']:.3f} | {row['answers_per_question']:.2f} | {row['seconds']:.1f} |"
        )
    lines += ["", "## First questions", "", "| expected | " + " | ".join(r["generations"]) + " |"]
    lines.append("|---|" + "---|" * len(r["generations"]))
    for i in range(min(5, r["n_questions"])):
        cells = [r["expected"][i], *(g[i] for g in r["generations"].values())]
        shown = [c.strip().replace("|", "\\|").replace("\n", "⏎ ") or "(empty)" for c in cells]
        lines.append("| " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"
