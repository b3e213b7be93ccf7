"""Evaluation: perplexity, held-out exact match, preference accuracy, samples and a pairwise comparison.

Reads one `hf-model` (optionally with a PEFT adapter), scores it on held-out data and writes
`eval.json` (the `eval-report` artifact: flat keys, documented in skillbook.ml.evaluate.EVAL_REPORT_KEYS)
and `report.md`. With `compare_model` set, the same numbers are measured for a second model and
the two are compared question by question (win / tie / loss by exact match).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pydantic import Field

from skillbook.errors import ConfigError
from skillbook.ml.data_files import EvalCorpusPath, EvalDataPath
from skillbook.run.recipe import HUB_ID_RE, RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"report": "eval-report"}
INPUTS = {
    "model": "hf-model|gguf",
    "adapter": "adapter",
    "tokenizer": "tokenizer",
    "corpus": "corpus",
    "eval_data": "sft-data",
    "preference_data": "preference-data",
    "compare_model": "hf-model|gguf",
}


class Config(RecipeConfig):
    # ---- what to evaluate
    model: str = Field(
        ...,
        description=(
            "The model to evaluate: an hf-model dir (save_pretrained, tokenizer inside), a .gguf file "
            "(dequantized by transformers), or a hub id such as Qwen/Qwen2.5-0.5B (hub only when online)."
        ),
    )
    adapter: str | None = Field(
        None, description="Optional PEFT adapter dir on top of `model` (merged before scoring)."
    )
    tokenizer: str | None = Field(
        None,
        description=(
            "Tokenizer dir instead of the model's own (e.g. for a .gguf file: faster and exact); "
            "used for model and compare_model. None = each model's own."
        ),
    )
    compare_model: str | None = Field(
        None,
        description=(
            "Optional second hf-model or .gguf (e.g. the base before SFT): same metrics, plus "
            "win/tie/loss by exact match on the same prompts."
        ),
    )
    # ---- on what
    corpus: EvalCorpusPath | None = Field(
        None,
        description=(
            "Held-out text scored for perplexity: a .jsonl/.json/.parquet file of {text} rows or a .txt file (every "
            "document), or a corpus folder (its val.jsonl); None = eval_data's prompt + completion text when "
            "eval_data is set, else the embedded synthetic world (the summary's perplexity_data says which)."
        ),
    )
    eval_data: EvalDataPath | None = Field(
        None,
        description=(
            "Held-out {prompt, completion} rows: a .jsonl/.json/.parquet file (every row is scored) or a folder "
            "(test.jsonl, or eval/validation); None = the embedded default held-out set."
        ),
    )
    preference_data: EvalDataPath | None = Field(
        None,
        description=(
            "Optional {prompt, chosen, rejected} pairs for preference accuracy: a file (every row) or a "
            "preference-data folder (its test.jsonl). None = skipped."
        ),
    )
    chat_template: bool = Field(
        False,
        description=(
            "Render prompts through the tokenizer's chat template (as sft/dpo do with chat_template: true); "
            "must match how the model was tuned."
        ),
    )
    max_examples: int = Field(
        500,
        ge=1,
        description=(
            "Cap on documents / questions / pairs taken from each split (the first N, so runs stay comparable)."
        ),
    )
    # ---- how
    max_length: int = Field(
        256, ge=8, description="Perplexity window in tokens; longer documents are split into windows."
    )
    max_new_tokens: int = Field(
        8, ge=1, description="Greedy tokens generated per held-out question (answers are short)."
    )
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass / generate call.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto = cuda when available, else cpu."
    )
    # ---- sample generations for the report (metrics above are always greedy)
    num_samples: int = Field(4, ge=0, description="Sample generations written to the report (held-out prompts).")
    sample_prompts: list[str] | None = Field(
        None, description=("Prompts for the samples, used verbatim; None = the first num_samples held-out questions.")
    )
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature of the samples (0 = greedy).")
    top_k: int = Field(50, ge=0, description="Top-k of the samples (0 = off).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus top-p of the samples (1.0 = off).")
    sample_max_new_tokens: int = Field(24, ge=1, description="Max new tokens of each sample generation.")
    seed: int = Field(0, description="Seed of the sample generations.")


def model_path(ref: str, field: str) -> str:
    """A local model dir that exists, or a hub id when the hub is reachable; one clear error otherwise.

    The runner already refuses missing inputs before the run starts; this keeps run() safe when called directly.
    """
    path = Path(ref).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if path.exists() or offline or not HUB_ID_RE.match(ref) or ref.startswith((".", "/", "~")):
        return str(artifact_path(ref, field))
    return ref  # looks like owner/name and we are online: transformers downloads it


def held_out_data(cfg: Config, ctx: RunContext) -> tuple[list[str], list[dict], list[dict]]:
    """(documents, questions, pairs) to score, the first max_examples of each, every row checked; the log and
    the summary say where the perplexity text came from, so the embedded world is never used silently."""
    from skillbook.ml.data_files import load_held_out, read_texts

    defaults: dict[str, Path] = {}
    if cfg.corpus is None or cfg.eval_data is None:
        from skillbook.ml.synthetic import write_default_data

        defaults = write_default_data(ctx.out_dir / "data", seed=0)  # the held-out splits of the default world
    n = cfg.max_examples
    q = load_held_out(cfg.eval_data or defaults["eval_data"], "eval_data", ("prompt", "completion"))
    questions = q.held[:n]
    q_from = q.held_source if cfg.eval_data else "the embedded synthetic held-out set"
    ctx.info(f"eval_data: scoring {len(questions):,} of {len(q.held):,} rows of {q_from}")
    if cfg.corpus:
        c = load_held_out(cfg.corpus, "corpus", None)
        texts, source = c.held[:n], c.held_source
    elif cfg.eval_data:  # the user's own text, not the synthetic world their model has never seen
        texts, source = [r["prompt"] + r["completion"] for r in questions], f"eval_data prompt + completion ({q_from})"
        ctx.info("no corpus given: perplexity is on eval_data's prompt + completion text (corpus=FILE to choose)")
    else:
        texts = read_texts(defaults["corpus"] / "val.jsonl")[:n]
        source = "embedded synthetic world"
        ctx.info("no corpus given: perplexity is on the embedded synthetic world, not your data (set corpus=FILE)")
    ctx.info(f"corpus: perplexity on {len(texts):,} documents of {source}")
    ctx.summary["perplexity_data"] = source
    pairs: list[dict] = []
    if cfg.preference_data:
        p = load_held_out(cfg.preference_data, "preference_data", ("prompt", "chosen", "rejected"))
        pairs = p.held[:n]
        ctx.info(f"preference_data: scoring {len(pairs):,} of {len(p.held):,} pairs of {p.held_source}")
    return texts, questions, pairs


def measure(
    step: int,
    name: str,
    path: str,
    adapter: str | None,
    texts: list[str],
    questions: list[dict],
    pairs: list[dict],
    cfg: Config,
    device: str,
    ctx: RunContext,
) -> dict:
    """Perplexity, exact match (with per-row results) and preference accuracy of one model."""
    from skillbook.ml import evaluate as ev

    t0 = time.time()
    model, tok = ev.load_model_and_tokenizer(path, adapter, device=device, tokenizer=cfg.tokenizer)
    if cfg.chat_template:  # the rendering SFT/DPO trained on, or exact match measures a format mismatch
        from skillbook.ml.finetune_data import render_chat

        if not tok.chat_template:
            raise ConfigError(f"chat_template: the tokenizer of {path} has no chat template; set it false")
        questions, pairs = render_chat(tok, questions), render_chat(tok, pairs)
    ppl = ev.perplexity_stats(model, tok, texts, cfg.max_length, cfg.batch_size)
    ctx.info(f"{name}: perplexity {ppl['perplexity']:.3f} over {ppl['n_tokens']} tokens")
    em = ev.exact_match(model, tok, questions, cfg.max_new_tokens, cfg.batch_size)
    ctx.info(f"{name}: exact match {em['exact_match']:.3f} on {em['n']} questions")
    pref = ev.preference_accuracy(model, tok, pairs, cfg.batch_size) if pairs else None
    if pref:
        ctx.info(f"{name}: preference accuracy {pref['preference_accuracy']:.3f} on {pref['n']} pairs")
    ctx.log(
        step=step,
        model=name,
        perplexity=ppl["perplexity"],
        exact_match=em["exact_match"],
        seconds=round(time.time() - t0, 2),
    )
    return {"model": model, "tok": tok, "ppl": ppl, "em": em, "pref": pref, "questions": questions}


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    t_start = time.time()
    # ---- inputs: check every path before loading anything heavy -------------------------------
    model_ref = model_path(cfg.model, "model")
    adapter = str(artifact_path(cfg.adapter, "adapter")) if cfg.adapter else None
    if cfg.tokenizer:
        artifact_path(cfg.tokenizer, "tokenizer")
    compare_ref = model_path(cfg.compare_model, "compare_model") if cfg.compare_model else None
    if not ctx.is_main:  # scoring is cheap next to training: under torchrun, rank 0 evaluates alone
        return {}
    # Take the first N rows, not a random subset: two runs (or two models) then see the same examples.
    texts, questions, pairs = held_out_data(cfg, ctx)

    import torch

    from skillbook.ml import evaluate as ev

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    ctx.info(f"device {device}; {len(texts)} documents, {len(questions)} questions, {len(pairs)} preference pairs")
    ctx.progress(2 if compare_ref else 1, "evaluating")

    # ---- the model under test -------------------------------------------------------------------
    main = measure(1, "model", model_ref, adapter, texts, questions, pairs, cfg, device, ctx)
    em, ppl, pref = main["em"], main["ppl"], main["pref"]
    kinds = sorted({q.get("kind", "all") for q in questions})
    by_kind = {
        k: sum(c for c, q in zip(em["correct"], questions) if q.get("kind", "all") == k)
        / sum(q.get("kind", "all") == k for q in questions)
        for k in kinds
    }

    # ---- samples: what the model actually writes, with the sampling knobs ----------------------
    prompts = cfg.sample_prompts or [q["prompt"] for q in main["questions"][: cfg.num_samples]]
    gens = (
        ev.generate_answers(
            main["model"],
            main["tok"],
            prompts,
            cfg.sample_max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            cfg.seed,
            cfg.batch_size,
        )
        if prompts
        else []
    )
    samples = [{"prompt": p, "generation": g} for p, g in zip(prompts, gens)]
    del main  # free the first model before loading the second

    # ---- pairwise comparison on the same prompts ------------------------------------------------
    cmp = None
    if compare_ref:
        cmp = measure(2, "compare_model", compare_ref, None, texts, questions, pairs, cfg, device, ctx)
        duel = ev.pairwise(em["correct"], cmp["em"]["correct"])
        ctx.info(
            f"model vs compare_model: {duel['wins']} wins, {duel['ties']} ties, {duel['losses']} losses "
            f"(win rate {duel['win_rate']:.3f}, sign-test p {duel['pvalue']:.3g})"
        )

    # ---- the eval-report: flat keys, every one present (null when not measured) ----------------
    report = {
        "model": cfg.model,
        "adapter": cfg.adapter,
        "perplexity": ppl["perplexity"],
        "val_loss": ppl["val_loss"],
        "bits_per_byte": ppl["bits_per_byte"],
        "n_perplexity_docs": ppl["n_docs"],
        "n_perplexity_tokens": ppl["n_tokens"],
        "exact_match": em["exact_match"],
        "exact_match_stderr": em["stderr"],
        "n_exact_match": em["n"],
        "exact_match_by_kind": by_kind,
        "preference_accuracy": pref["preference_accuracy"] if pref else None,
        "preference_margin": pref["mean_margin"] if pref else None,
        "n_preference": pref["n"] if pref else 0,
        "compare_model": cfg.compare_model,
        "compare_perplexity": cmp["ppl"]["perplexity"] if cmp else None,
        "compare_exact_match": cmp["em"]["exact_match"] if cmp else None,
        "compare_preference_accuracy": cmp["pref"]["preference_accuracy"] if cmp and cmp["pref"] else None,
        "wins": duel["wins"] if cmp else None,
        "ties": duel["ties"] if cmp else None,
        "losses": duel["losses"] if cmp else None,
        "win_rate": duel["win_rate"] if cmp else None,
        "win_pvalue": duel["pvalue"] if cmp else None,
        "sample_temperature": cfg.temperature,
        "sample_top_k": cfg.top_k,
        "sample_top_p": cfg.top_p,
        "sample_max_new_tokens": cfg.sample_max_new_tokens,
        "samples": samples,
        "exact_match_samples": em["samples"],
        "seconds": round(time.time() - t_start, 2),
    }
    missing = set(ev.EVAL_REPORT_KEYS) ^ set(report)
    assert not missing, f"eval.json keys and EVAL_REPORT_KEYS disagree: {sorted(missing)}"
    out = ctx.out_dir / "eval.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    ctx.summary.update(
        {
            k: v
            for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("sample_")
        }
    )
    ctx.report(ev.render_report(report))
    return {"report": out}
