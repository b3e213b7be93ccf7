"""Model merging helpers: split question rows into tasks, merge LoRA adapters with PEFT, merge whole models
(linear, SLERP), score each model per task, and say how much of each single adapter's gain a merge keeps.

- `question_kind` / `split_by_kind`: the embedded world asks three kinds of questions (closed-book facts,
  single-digit arithmetic, reading a two-sentence passage); the kind is read off the prompt, so any file in
  the same "Question: ...\\nAnswer:" format splits the same way.
- `add_merge`: one call to PEFT's `LoraModel.add_weighted_adapter` (linear, cat, svd, ties, dare, ...);
  PEFT does the arithmetic on the adapters' A/B factors or on their delta weights.
- `merge_state_dicts`: whole-model linear interpolation and SLERP, tensor by tensor. mergekit (the usual
  tool) is not a dependency of this project, and each method is a few lines of torch: lerp is
  (1 - t) a + t b; SLERP walks the great circle between the two flattened tensors (mergekit's formula,
  falling back to lerp when they are nearly parallel).
- `task_scores` / `kept`: the per-task score of a model (held-out answer loss, preference accuracy or exact
  match), and the share of a single adapter's gain over the base that a merge keeps on that adapter's task.

Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations

import re
from typing import Any

from skillbook.errors import ConfigError

# The question kinds of the embedded world, as `question_kind` reads them off a prompt.
KINDS = ("fact", "arithmetic", "reading")
# PEFT 0.21's add_weighted_adapter combination types. The plain ones combine the A and B factors (same rank
# r for every adapter); cat stacks them (rank = sum of ranks, exact); *_svd combine the delta weights B @ A
# and factor the sum back to rank r with an SVD.
PEFT_METHODS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# Whole-model methods, on the two merged (base + adapter) models.
MODEL_METHODS = ("model_linear", "model_slerp")
# The methods that keep only a `density` share of each update (PEFT's `density` argument).
DENSITY_METHODS = tuple(m for m in PEFT_METHODS if m.startswith(("ties", "dare", "magnitude")))

_ARITHMETIC = re.compile(r"\b\d+ (plus|minus) \d+\b")


# ---------------------------------------------------------------------------------------------
# Tasks: the rows of one question kind
# ---------------------------------------------------------------------------------------------


def question_kind(prompt: str) -> str:
    """'arithmetic' (x plus/minus y), 'reading' (a passage before the question), or 'fact' (closed-book)."""
    if not prompt.lstrip().startswith("Question:"):
        return "reading"
    return "arithmetic" if _ARITHMETIC.search(prompt) else "fact"


def split_by_kind(rows: list[dict], kinds: list[str], fld: str, min_rows: int = 1) -> dict[str, list[dict]]:
    """The rows of each kind in `kinds`; a kind with fewer than `min_rows` rows is a ConfigError on `fld`."""
    out: dict[str, list[dict]] = {k: [] for k in kinds}
    for row in rows:
        kind = row.get("kind") or question_kind(row["prompt"])
        if kind in out:
            out[kind].append(row)
    short = {k: len(v) for k, v in out.items() if len(v) < min_rows}
    if short:
        counts = ", ".join(f"{k}: {n}" for k, n in short.items())
        raise ConfigError(
            f"{fld}: too few rows of task kind(s) {counts} (need {min_rows}); the kind is read off each prompt "
            f"('x plus y' = arithmetic, a passage before 'Question:' = reading, else fact): pass data with "
            f"rows of every kind in tasks, or change tasks"
        )
    return out


def task_rows(
    ctx: Any,
    data: str | None,
    eval_data: str | None,
    tasks: list[str],
    metric: str,
    limit: int,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[dict[str, list[dict]], dict[str, list[dict]], dict[str, list[dict]]]:
    """(training rows, validation rows, held-out rows) per task, checked before any model loads: `data` rows
    {prompt, completion}, of which a seeded `val_fraction` of each task's rows is set aside as validation (never
    trained on; the merge weights are chosen on it), `eval_data` rows {prompt, chosen, rejected} ({prompt,
    completion} do unless metric is preference_accuracy) scored at the end, each None = the embedded world's sft
    train / preference test split."""
    import random

    from skillbook.ml.data_files import load_held_out, load_splits
    from skillbook.ml.finetune_data import default_data

    qa, pair = ("prompt", "completion"), ("prompt", "chosen", "rejected")
    train = load_splits(data or default_data(ctx, "sft_data"), "data", qa, 0.1, 0, split=False).train
    cols = pair if metric == "preference_accuracy" else ("prompt",)  # else the right answer suffices
    held = load_held_out(eval_data or default_data(ctx, "preference_data"), "eval_data", cols).held
    if bad := next((r for r in held if "completion" not in r and "chosen" not in r), None):
        raise ConfigError(f"eval_data: row {bad['prompt'][:60]!r} has neither 'chosen' nor 'completion' (the answer)")
    train_by, held_by = split_by_kind(train, tasks, "data", 8), split_by_kind(held, tasks, "eval_data", 8)
    held_by = {k: v[:limit] for k, v in held_by.items()}
    val_by: dict[str, list[dict]] = {}
    for k, rows in train_by.items():
        rows = rows[:]
        random.Random(seed).shuffle(rows)
        n_val = max(4, round(val_fraction * len(rows))) if val_fraction > 0 else 0
        val_by[k], train_by[k] = rows[:n_val], rows[n_val:]
    ctx.info(
        ", ".join(f"{k}: {len(train_by[k])} train / {len(val_by[k])} val / {len(held_by[k])} held-out" for k in tasks)
    )
    return train_by, val_by, held_by


# ---------------------------------------------------------------------------------------------
# Merging: PEFT for adapters, a few lines of torch for whole models
# ---------------------------------------------------------------------------------------------


def add_merge(
    peft_model: Any, adapters: list[str], weights: list[float], name: str, method: str, density: float
) -> None:
    """Add adapter `name` = PEFT's `method` merge of `adapters` with `weights` (density for ties/dare/prune)."""
    extra: dict[str, Any] = {"density": density} if method in DENSITY_METHODS else {}
    peft_model.add_weighted_adapter(adapters, weights, name, combination_type=method, **extra)


def slerp(a: Any, b: Any, t: float, eps: float = 1e-8, parallel: float = 0.9995) -> Any:
    """Spherical interpolation between tensors a and b at t (0 = a, 1 = b), as mergekit computes it: the angle
    comes from the normalised flattened tensors, the weights sin((1-t) theta) / sin theta and sin(t theta) /
    sin theta apply to the raw ones; nearly parallel tensors (|cos| > `parallel`) fall back to lerp."""
    import torch

    a32, b32 = a.float(), b.float()
    na, nb = a32.flatten() / (a32.norm() + eps), b32.flatten() / (b32.norm() + eps)
    dot = torch.clamp((na * nb).sum(), -1.0, 1.0).item()
    if abs(dot) > parallel:
        return torch.lerp(a32, b32, t).to(a.dtype)
    theta = torch.arccos(torch.tensor(dot))
    s = torch.sin(theta)
    out = torch.sin((1 - t) * theta) / s * a32 + torch.sin(t * theta) / s * b32
    return out.to(a.dtype)


def merge_state_dicts(a: dict[str, Any], b: dict[str, Any], method: str, t: float) -> tuple[dict[str, Any], float]:
    """Whole-model `method` ('model_linear' or 'model_slerp') of two state dicts of one architecture at t
    (0 = a, 1 = b); returns the merged state dict and, for SLERP, the share of tensors that fell back to lerp
    (two fine-tunes of one base are nearly parallel in most tensors)."""
    import torch

    if a.keys() != b.keys():
        raise ConfigError("methods: whole-model merging needs two models of the same architecture")
    out, lerped = {}, 0
    for key, ta in a.items():
        tb = b[key]
        if method == "model_linear" or not ta.is_floating_point():
            out[key] = torch.lerp(ta.float(), tb.float(), t).to(ta.dtype) if ta.is_floating_point() else ta
            continue
        merged = slerp(ta, tb, t)
        lerped += bool(torch.allclose(merged, torch.lerp(ta.float(), tb.float(), t).to(ta.dtype)))
        out[key] = merged
    return out, (lerped / len(a) if method == "model_slerp" else 1.0)


def finetuned_state(model_ref: str, adapter_dir: Any, weights: str = "auto") -> dict[str, Any]:
    """The state dict of base + one LoRA adapter merged into its weights (the fine-tune as a full model)."""
    from peft import PeftModel

    from skillbook.ml.hf_models import load_causal_lm

    return (
        PeftModel.from_pretrained(load_causal_lm(model_ref, weights=weights), adapter_dir)
        .merge_and_unload()
        .state_dict()
    )


# ---------------------------------------------------------------------------------------------
# Scores per task, and what a merge keeps
# ---------------------------------------------------------------------------------------------


# metric -> True when higher is better
HIGHER_IS_BETTER = {"answer_loss": False, "preference_accuracy": True, "exact_match": True}


def answer(row: dict) -> str:
    """The right answer of a held-out row: its completion, or the chosen answer of a preference pair."""
    return row["completion"] if "completion" in row else row["chosen"]


def task_scores(model: Any, tok: Any, rows: dict[str, list[dict]], metric: str, max_new_tokens: int = 8) -> dict:
    """{task: score} of `model` on each task's held-out rows, for `metric`:

    - answer_loss: mean over rows of -log p(right answer | prompt) in nats (summed over the answer's tokens);
      lower is better, and it moves even when a 1M-parameter model rarely gets the answer exactly right;
    - preference_accuracy: share of rows with log p(chosen | prompt) > log p(rejected | prompt);
    - exact_match: share of greedy answers that equal the right one.
    """
    from skillbook.ml.evaluate import completion_logprobs, exact_match, preference_accuracy

    model.eval()
    out = {}
    for task, held in rows.items():
        if metric == "answer_loss":
            logp = completion_logprobs(model, tok, [r["prompt"] for r in held], [answer(r) for r in held])
            out[task] = -sum(logp) / len(logp)
        elif metric == "preference_accuracy":
            out[task] = preference_accuracy(model, tok, held)["preference_accuracy"]
        else:
            qa = [{"prompt": r["prompt"], "completion": answer(r)} for r in held]
            out[task] = exact_match(model, tok, qa, max_new_tokens)["exact_match"]
    return out


def kept(merged: float, single: float, base: float, higher_is_better: bool = True) -> float:
    """Share of the single adapter's gain over the base that the merge keeps on that adapter's task:
    (merged - base) / (single - base), signs flipped for a lower-is-better score. 1.0 = all of it, above 1 =
    the merge beats the single adapter; nan when the single adapter gained nothing."""
    gain, got = (single - base, merged - base) if higher_is_better else (base - single, base - merged)
    return got / gain if gain > 0 else float("nan")


def rank(results: dict[str, dict], methods: list[str], tasks: list[str], higher_is_better: bool) -> list[str]:
    """Add 'kept' ({task: share}) and 'min_kept' to each method's results; the methods, best first: ranked by
    the worst task's share (a merge must keep both skills), a nan share (no gain to keep) last."""
    base = results["base"]
    for m in methods:
        r = results[m]
        r["kept"] = {t: kept(r[t], results[f"adapter {t}"][t], base[t], higher_is_better) for t in tasks}
        r["min_kept"] = min(r["kept"].values())
    return sorted(
        methods, key=lambda m: -results[m]["min_kept"] if results[m]["min_kept"] == results[m]["min_kept"] else 1e9
    )


def table(results: dict[str, dict], rows: list[str], tasks: list[str], best: str) -> str:
    """The markdown table: each model's score on each task, what each merge keeps, and its weights or t."""
    lines = [
        "| model | " + " | ".join(tasks) + " | " + " | ".join(f"kept {t}" for t in tasks) + " | weights / t |",
        "|---|" + "---:|" * (2 * len(tasks)) + "---|",
    ]
    for n in rows:
        r = results[n]
        kept_cells = [f"{r['kept'][t]:.2f}" if "kept" in r else "-" for t in tasks]
        how = ", ".join(f"{w:g}" for w in r["weights"]) if "weights" in r else f"t = {r['t']:g}" if "t" in r else "-"
        name = f"{n} (best)" if n == best else n
        cells = " | ".join(f"{r[t]:.3f}" for t in tasks) + " | " + " | ".join(kept_cells)
        lines.append(f"| {name} | {cells} | {how} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Choosing the merge weights on validation rows
# ---------------------------------------------------------------------------------------------


def min_kept(scores: dict, ref: dict, higher_is_better: bool) -> float:
    """The worse task's `kept` share of a model's `scores`; ref = {"base": scores, task: that adapter's scores}."""
    tasks = [t for t in ref if t != "base"]
    return min(kept(scores[t], ref[t][t], ref["base"][t], higher_is_better) for t in tasks)


def reference_scores(peft_model: Any, tok: Any, adapters: list[str], rows: dict, metric: str) -> dict:
    """{"base": scores, adapter: scores} on `rows`, for `min_kept` (adapters are named by their task)."""
    with peft_model.disable_adapter():
        ref = {"base": task_scores(peft_model, tok, rows, metric)}
    for name in adapters:
        peft_model.set_adapter(name)
        ref[name] = task_scores(peft_model, tok, rows, metric)
    return ref


def search_weights(
    peft_model: Any,
    tok: Any,
    adapters: list[str],
    method: str,
    density: float,
    grid: list[float],
    val: dict[str, list[dict]],
    ref: dict,
    metric: str,
    seed: int = 0,
) -> tuple[list[float], float]:
    """The weight pair out of grid x grid whose `method` merge keeps the most of both adapters' gain (the worse
    task's `kept`, against `ref` scored on the same rows) on the validation rows `val`, and that share: the
    choice never sees the held-out rows the merges are judged on."""
    import itertools

    import torch

    best: tuple[float, list[float]] = (float("-inf"), [1.0] * len(adapters))
    for pair in itertools.product(grid, repeat=len(adapters)):
        torch.manual_seed(seed)  # DARE drops at random: the same draw as the final merge
        add_merge(peft_model, adapters, list(pair), "_search", method, density)
        peft_model.set_adapter("_search")
        share = min_kept(task_scores(peft_model, tok, val, metric), ref, HIGHER_IS_BETTER[metric])
        peft_model.set_adapter(adapters[0])
        peft_model.delete_adapter("_search")
        if share > best[0]:
            best = (share, list(pair))
    return best[1], best[0]


# Candidate t of the whole-model merges when the recipe chooses it on validation rows.
T_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)


def search_t(
    model: Any, tok: Any, a: dict, b: dict, method: str, val: dict[str, list[dict]], ref: dict, metric: str
) -> tuple[float, float]:
    """The t out of T_GRID whose whole-model `method` merge of state dicts a, b (loaded into `model`) keeps the
    most of both gains on the validation rows, and that share."""
    best = (float("-inf"), 0.5)
    for t in T_GRID:
        model.load_state_dict(merge_state_dicts(a, b, method, t)[0])
        share = min_kept(task_scores(model, tok, val, metric), ref, HIGHER_IS_BETTER[metric])
        best = max(best, (share, t))
    return best[1], best[0]
