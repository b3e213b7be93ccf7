"""Evaluation metrics shared by recipes, tests and pipeline reports.

Everything here works on any causal LM that `AutoModelForCausalLM` loads (optionally with a
PEFT adapter on top) and its tokenizer:

- `perplexity`: exp of the mean next-token loss over held-out documents.
- `generate_answers`: batched generation with left padding, greedy by default.
- `exact_match`: first answer words of a generation vs the expected completion.
- `preference_accuracy`: does the model give the chosen answer more log-probability than the rejected one?
- `pairwise`: win/tie/loss of two models' per-question exact-match results.

`EVAL_REPORT_KEYS` documents every key of the `eval-report` JSON the evaluation recipe writes.
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from typing import Any

# Every key of eval.json (the `eval-report` artifact), flat, always present (null when not measured).
EVAL_REPORT_KEYS: dict[str, str] = {
    "model": "path or hub id of the evaluated model",
    "adapter": "PEFT adapter applied on top of `model`, or null",
    "perplexity": "exp(mean next-token loss) on the held-out corpus split (val.jsonl); lower is better",
    "val_loss": "mean next-token cross-entropy in nats on the same tokens (log of perplexity)",
    "bits_per_byte": "total loss in bits / UTF-8 bytes of the documents: comparable across tokenizers",
    "n_perplexity_docs": "documents scored for perplexity",
    "n_perplexity_tokens": "tokens predicted (and averaged over) for perplexity",
    "exact_match": "fraction of held-out questions whose generated answer equals the expected one",
    "exact_match_stderr": "standard error of exact_match, sqrt(p(1-p)/n): a 95% interval is about ±2 of these",
    "n_exact_match": "held-out questions asked",
    "exact_match_by_kind": "exact match per question `kind` of the held-out set (e.g. fact, arithmetic)",
    "preference_accuracy": "fraction of preference pairs where log p(chosen|prompt) > log p(rejected|prompt)",
    "preference_margin": "mean of log p(chosen|prompt) - log p(rejected|prompt) in nats",
    "n_preference": "preference pairs scored",
    "compare_model": "the second model of the pairwise comparison, or null",
    "compare_perplexity": "perplexity of compare_model on the same documents",
    "compare_exact_match": "exact-match accuracy of compare_model on the same questions",
    "compare_preference_accuracy": "preference accuracy of compare_model on the same pairs",
    "wins": "questions `model` answers correctly and compare_model does not",
    "ties": "questions both answer correctly or both answer wrongly",
    "losses": "questions compare_model answers correctly and `model` does not",
    "win_rate": "(wins + 0.5 * ties) / n_exact_match; 0.5 = no difference, above 0.5 = `model` is better",
    "win_pvalue": "two-sided sign test of wins vs losses (ties dropped): below 0.05 = unlikely to be luck",
    "sample_temperature": "temperature of the sample generations (0 = greedy)",
    "sample_top_k": "top-k of the sample generations (0 = off)",
    "sample_top_p": "top-p of the sample generations (1.0 = off)",
    "sample_max_new_tokens": "max new tokens of the sample generations",
    "samples": "list of {prompt, generation} made with the sampling settings above",
    "exact_match_samples": "first 5 {prompt, answer, expected, correct} of the exact-match set",
    "seconds": "wall-clock seconds of the whole evaluation",
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_model_and_tokenizer(
    path: str | Path, adapter: str | Path | None = None, device: str = "cpu", tokenizer: str | Path | None = None
) -> tuple[Any, Any]:
    """An eval-mode causal LM and its tokenizer: an hf-model dir or hub id, a .gguf file, or either + a PEFT adapter.

    A GGUF file is dequantized by transformers into a torch model, so its numbers include the weight
    quantization error (not llama.cpp's kernels). The tokenizer comes from `tokenizer`, else the adapter
    dir if it saved one, else the model dir, else the GGUF file's own vocabulary.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml.model_files import check_model_path

    check_model_path(path)
    gguf = str(path).endswith(".gguf")
    model_dir, extra = (str(Path(path).parent), {"gguf_file": Path(path).name}) if gguf else (str(path), {})
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    elif adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(adapter))  # sft/dpo may add chat tokens
    else:
        tok = AutoTokenizer.from_pretrained(model_dir, **extra)
    if tok.pad_token is None:  # generation pads batches; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra)
    if adapter is not None:
        from peft import PeftModel

        # Merging once makes every later forward pass as cheap as the base model's.
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    # PreTrainedModel.to is decorated with functools.wraps, which typeshed types as an unbound function
    model.to(device).eval()  # type: ignore[arg-type]
    return model, tok


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------


def _nll_sum(
    model: Any, ids: list[list[int]], pad_id: int, score_from: list[int] | None = None
) -> tuple[list[float], list[int]]:
    """Summed next-token NLL and token count per sequence; tokens before score_from[i] only give context."""
    import torch

    width = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):  # right padding: positions stay 0..n-1 for the real tokens
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = input_ids[:, 1:].to(device)
    token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    scored = mask[:, 1:].clone().to(device)
    if score_from is not None:
        for i, start in enumerate(score_from):  # target index j predicts token j+1
            scored[i, : max(start - 1, 0)] = 0
    nll = -(token_logp * scored).sum(-1)
    return nll.tolist(), scored.sum(-1).tolist()


def _encode(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def perplexity(model: Any, tokenizer: Any, texts: list[str], max_length: int = 256, batch_size: int = 8) -> float:
    """exp(total NLL / predicted tokens) over `texts`; long documents are cut into max_length windows
    (at most the model's max_position_embeddings)."""
    return perplexity_stats(model, tokenizer, texts, max_length, batch_size)["perplexity"]


def perplexity_stats(model: Any, tokenizer: Any, texts: list[str], max_length: int = 256, batch_size: int = 8) -> dict:
    """Perplexity plus the mean loss and how many documents and tokens it averages over."""
    # Never score past the context the model was built for: positions it never saw inflate the loss.
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", None) or max_length)
    windows: list[list[int]] = []
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    for text in texts:
        ids = _encode(tokenizer, text)
        # Non-overlapping windows: every token is scored once; a window's first token has no context.
        windows += [ids[i : i + max_length] for i in range(0, len(ids), max_length) if len(ids[i : i + max_length]) > 1]
    if not windows:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    windows.sort(key=len)  # similar lengths per batch waste less compute on padding
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        nll, n = _nll_sum(model, windows[i : i + batch_size], tokenizer.pad_token_id or 0)
        total, count = total + sum(nll), count + int(sum(n))
    loss = total / count
    # Bits per byte divides by text length, not token count, so models with different tokenizers compare.
    return {
        "perplexity": math.exp(loss),
        "val_loss": loss,
        "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
        "n_docs": len(texts),
        "n_tokens": count,
    }


# ---------------------------------------------------------------------------------------------
# Generation and exact match
# ---------------------------------------------------------------------------------------------


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 8,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Continuations of `prompts` (new text only), batched with left padding; greedy when temperature == 0."""
    import torch
    from transformers import GenerationConfig

    sample = temperature > 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=(top_k or None) if sample else None,
        top_p=top_p if sample else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    # Left padding keeps every prompt's last token at the end of the row, where generation continues.
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                gen = model.generate(**batch, generation_config=gen_cfg)
            new = gen[:, batch["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD-style answer normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_matches(generation: str, expected: str) -> bool:
    """Does the first non-empty line of the generation start with the expected answer's words (after normalising)?"""
    want = normalize(expected).split()
    lines = generation.strip().splitlines()
    got = normalize(lines[0] if lines else "").split()
    return bool(want) and got[: len(want)] == want


def exact_match(model: Any, tokenizer: Any, rows: list[dict], max_new_tokens: int = 8, batch_size: int = 16) -> dict:
    """Greedy answers to rows {"prompt","completion"}; exact_match, n, per-row `correct`, first 5 samples."""
    answers = generate_answers(
        model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    correct = [answer_matches(a, r["completion"]) for a, r in zip(answers, rows)]
    samples = [
        {"prompt": r["prompt"], "answer": a, "expected": r["completion"], "correct": c}
        for r, a, c in list(zip(rows, answers, correct))[:5]
    ]
    acc = sum(correct) / max(len(rows), 1)
    return {
        "exact_match": acc,
        "stderr": math.sqrt(acc * (1 - acc) / max(len(rows), 1)),
        "n": len(rows),
        "correct": correct,
        "answers": answers,
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------
# Log-probabilities of completions: preference accuracy
# ---------------------------------------------------------------------------------------------


def completion_logprobs(
    model: Any, tokenizer: Any, prompts: list[str], completions: list[str], batch_size: int = 8
) -> list[float]:
    """Sum of log p(completion tokens | prompt) for each pair (prompt and completion tokenised apart)."""
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        p_ids = [_encode(tokenizer, p) for p in prompts[i : i + batch_size]]
        # Completions are tokenised on their own, as TRL does, so the chosen and rejected answers
        # share exactly the same prompt tokens and only the answer tokens are scored.
        c_ids = [_encode(tokenizer, c, special=False) for c in completions[i : i + batch_size]]
        nll, _ = _nll_sum(
            model,
            [p + c for p, c in zip(p_ids, c_ids)],
            tokenizer.pad_token_id or 0,
            score_from=[len(p) for p in p_ids],
        )
        out += [-x for x in nll]
    return out


def preference_accuracy(model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 8) -> dict:
    """Rows {"prompt","chosen","rejected"}: accuracy of log p(chosen) > log p(rejected), mean margin, n."""
    prompts = [r["prompt"] for r in rows]
    chosen = completion_logprobs(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size)
    rejected = completion_logprobs(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / max(len(rows), 1),
        "mean_margin": sum(margins) / max(len(rows), 1),
        "n": len(rows),
    }


# ---------------------------------------------------------------------------------------------
# Pairwise comparison
# ---------------------------------------------------------------------------------------------


def pairwise(correct_a: list[bool], correct_b: list[bool]) -> dict:
    """Win/tie/loss of model A against model B on the same questions, and A's win rate (ties count half)."""
    if len(correct_a) != len(correct_b):
        raise ValueError("pairwise comparison needs both models' results on the same questions")
    wins = sum(a and not b for a, b in zip(correct_a, correct_b))
    losses = sum(b and not a for a, b in zip(correct_a, correct_b))
    ties = len(correct_a) - wins - losses
    rate = (wins + 0.5 * ties) / len(correct_a) if correct_a else 0.5
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": rate, "pvalue": sign_test(wins, losses)}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` out of wins + losses under a fair coin."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "⏎ ").strip() or "(empty)"


def render_report(r: dict) -> str:
    """report.md for an eval-report dict: a metrics table (side by side when comparing) and samples."""
    has_cmp = r.get("compare_model") is not None
    lines = [f"# Evaluation of `{r['model']}`" + (f" + adapter `{r['adapter']}`" if r.get("adapter") else ""), ""]
    head = "| metric | model |" + (" compare_model |" if has_cmp else "")
    lines += [head, "|---|---|" + ("---|" if has_cmp else "")]
    rows = [
        ("perplexity (lower is better)", "perplexity", "compare_perplexity"),
        ("exact match", "exact_match", "compare_exact_match"),
        ("preference accuracy", "preference_accuracy", "compare_preference_accuracy"),
    ]
    for label, key, ckey in rows:
        lines.append(f"| {label} | {_fmt(r.get(key))} |" + (f" {_fmt(r.get(ckey))} |" if has_cmp else ""))
    lines += [
        "",
        f"Perplexity over {r['n_perplexity_tokens']} tokens of {r['n_perplexity_docs']} held-out documents "
        f"({r['bits_per_byte']:.3f} bits per byte); exact match on {r['n_exact_match']} held-out questions "
        f"(± {r['exact_match_stderr']:.3f} standard error); {r['n_preference']} preference pairs.",
        "",
    ]
    if r.get("exact_match_by_kind"):
        lines += ["| question kind | exact match |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in r["exact_match_by_kind"].items()] + [""]
    if has_cmp:
        lines += [
            f"Pairwise by exact match against `{r['compare_model']}`: {r['wins']} wins, {r['ties']} ties, "
            f"{r['losses']} losses, win rate {r['win_rate']:.3f} (0.5 = no difference), "
            f"sign-test p = {r['win_pvalue']:.3g}.",
            "",
        ]
    lines += ["## Held-out answers (greedy)", "", "| prompt | answer | expected | correct |", "|---|---|---|---|"]
    lines += [
        f"| {_cell(s['prompt'])} | {_cell(s['answer'])} | {_cell(s['expected'])} | {'yes' if s['correct'] else 'no'} |"
        for s in r["exact_match_samples"]
    ]
    lines += [
        "",
        f"## Samples (temperature {r['sample_temperature']}, top-k {r['sample_top_k']}, "
        f"top-p {r['sample_top_p']}, {r['sample_max_new_tokens']} new tokens)",
        "",
        "| prompt | generation |",
        "|---|---|",
    ]
    lines += [f"| {_cell(s['prompt'])} | {_cell(s['generation'])} |" for s in r["samples"]]
    return "\n".join(lines) + "\n"
