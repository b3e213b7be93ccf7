"""RLHF helpers for the rlhf recipe: a reward model (sequence classifier) as TRL's reward function, greedy and
sampled completions that remember whether they ended, the held-out reward, and the KL to the reference policy.

The reward model scores text, not token ids: it reads `prompt + completion + eos` with its own tokenizer, the
form TRL's RewardTrainer trained it on (its score is learned at the eos), so a reward model of another
family or tokenizer works too. Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skillbook.errors import ConfigError


def check_reward_model(ref: str, field: str = "reward_model") -> None:
    """Refuse a local model directory that is not a one-output sequence classifier, before anything loads."""
    config = Path(ref) / "config.json"
    if not config.is_file():
        return  # a hub id: transformers checks it when it loads
    data = json.loads(config.read_text(encoding="utf-8"))
    archs = data.get("architectures") or []
    labels = len(data["id2label"]) if isinstance(data.get("id2label"), dict) else data.get("num_labels", 2)
    if not any(str(a).endswith("ForSequenceClassification") for a in archs) or labels != 1:
        raise ConfigError(
            f"{field}: {ref} is not a reward model (architectures {archs or 'unknown'}, {labels} labels); pass a "
            f"one-output sequence classifier, e.g. the 'model' output of `skills run reward-modeling`, or omit "
            f"{field} to train one on the policy"
        )


def score(rm: Any, rm_tok: Any, prompts: list[str], completions: list[str], batch_size: int = 32) -> list[float]:
    """Reward-model scores of `prompt + completion + eos`, read at the last real token (the eos)."""
    from skillbook.ml.rewards import reward_scores

    eos = rm_tok.eos_token or ""
    side = rm_tok.padding_side
    rm_tok.padding_side = "right"  # the classifier finds the last non-pad token; right padding keeps it simple
    try:
        return reward_scores(rm, rm_tok, [p + c + eos for p, c in zip(prompts, completions)], batch_size)
    finally:
        rm_tok.padding_side = side


def reward_function(rm: Any, rm_tok: Any, ends: list[int], missing_eos_penalty: float) -> Callable[..., list[float]]:
    """TRL's reward function: the reward model's score, minus `missing_eos_penalty` for a completion that hit
    max_completion_length without ending (appending eos to it would score an unfinished answer as finished)."""

    def reward_model(prompts, completions, completion_ids, **_) -> list[float]:
        scores = score(rm, rm_tok, prompts, completions)
        ended = [bool(ids) and int(ids[-1]) in ends for ids in completion_ids]
        return [s - (0.0 if e else missing_eos_penalty) for s, e in zip(scores, ended)]

    return reward_model


def complete(
    model: Any,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids up to and including the first eos) per prompt; greedy at temperature 0."""
    import torch

    eos = eos_ids(model, tok)
    torch.manual_seed(seed)
    side, tok.padding_side = tok.padding_side, "left"  # generation continues from every row's right end
    device = next(model.parameters()).device
    prompt_ids: list[list[int]] = []
    completion_ids: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            sample = temperature > 0
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_k=None,
                    top_p=None,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos,
                )
            width = batch["input_ids"].shape[1]
            for row, mask, new in zip(batch["input_ids"], batch["attention_mask"], out[:, width:].tolist()):
                prompt_ids.append(row[mask.bool()].tolist())
                cut = next((j + 1 for j, t in enumerate(new) if t in eos), len(new))
                completion_ids.append(new[:cut])
    finally:
        tok.padding_side = side
    return prompt_ids, completion_ids


def eos_ids(model: Any, tok: Any) -> list[int]:
    """Every id that ends an answer: the generation config's eos ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted({*ids, tok.eos_token_id} - {None})


def heldout(
    policy: Any, tok: Any, rm: Any, rm_tok: Any, rows: list[dict], max_new_tokens: int, missing_eos_penalty: float
) -> dict[str, float]:
    """Greedy answers to held-out rows: mean reward (as in training: score minus the no-eos penalty), the bare
    reward-model score, exact match, and the share of answers that did not end within max_new_tokens."""
    from skillbook.ml.evaluate import answer_matches

    prompts = [r["prompt"] for r in rows]
    _, ids = complete(policy, tok, prompts, max_new_tokens)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    ends = eos_ids(policy, tok)
    rewards = reward_function(rm, rm_tok, ends, missing_eos_penalty)(prompts, texts, ids)
    scores = score(rm, rm_tok, prompts, texts)
    n = max(len(rows), 1)
    return {
        "heldout_reward": sum(rewards) / n,
        "heldout_rm_score": sum(scores) / n,
        "heldout_exact_match": sum(answer_matches(t, r["completion"]) for t, r in zip(texts, rows)) / n,
        "heldout_unfinished": sum(not i or i[-1] not in ends for i in ids) / n,
    }


def kl_to_reference(
    policy: Any, ref: Any, tok: Any, prompts: list[str], max_new_tokens: int, temperature: float, seed: int
) -> dict[str, float]:
    """KL(policy || reference) on completions sampled from the policy: the exact KL of the two next-token
    distributions at every completion position (all of the vocabulary, not a one-sample estimate), summed over
    the completion (nats per sequence, the quantity RLOO's beta penalises) and per token."""
    import torch

    prompt_ids, completion_ids = complete(policy, tok, prompts, max_new_tokens, temperature, seed)
    device = next(policy.parameters()).device
    total, tokens = 0.0, 0
    for p, c in zip(prompt_ids, completion_ids):
        if not c:
            continue
        ids = torch.tensor([p + c], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(policy(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
            logq = torch.log_softmax(ref(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
        total += (logp.exp() * (logp - logq)).sum().item()
        tokens += len(c)
    n = max(len(prompt_ids), 1)
    return {"kl_to_reference": total / n, "kl_per_token": total / max(tokens, 1)}


def report_md(
    cfg: Any, before: dict, after: dict, kl: dict, n_train: int, n_eval: int, train_rewards: list[float]
) -> str:
    """report.md: the held-out table before/after, the final KL, and the training reward curve in numbers."""
    lines = [
        "# RLHF run (RLOO against a reward model)",
        "",
        f"Policy `{cfg.model or 'sft default'}`, reward model `{cfg.reward_model or 'reward-modeling default'}`; "
        f"{cfg.steps} steps x {cfg.batch_size // cfg.num_generations} prompts x k={cfg.num_generations} samples, "
        f"beta={cfg.beta}, LoRA r={cfg.lora.r}, lr={cfg.optim.lr}; {n_train} train prompts, {n_eval} held out "
        "(greedy answers).",
        "",
        "| metric (held out) | before | after |",
        "|---|---:|---:|",
    ]
    for key, name in (
        ("heldout_reward", "reward (score - no-eos penalty)"),
        ("heldout_rm_score", "reward-model score"),
        ("heldout_exact_match", "exact match"),
        ("heldout_unfinished", "answers without eos"),
    ):
        lines.append(f"| {name} | {before[key]:.3f} | {after[key]:.3f} |")
    lines += [
        f"| KL(policy &#124;&#124; reference), nats per answer | 0 | {kl['kl_to_reference']:.3f} |",
        f"| KL per token | 0 | {kl['kl_per_token']:.4f} |",
    ]
    if train_rewards:
        picks = sorted({0, len(train_rewards) // 2, len(train_rewards) - 1})
        lines += ["", "Training reward (TRL's log): " + ", ".join(f"{train_rewards[i]:.3f}" for i in picks)]
    return "\n".join(lines) + "\n"
