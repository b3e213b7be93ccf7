"""Rewards the post-training recipes measure: a reward model's scalar scores and pairwise accuracy
(reward-modeling), and the verifiable exact-answer reward of sampled answers (grpo).

Heavy libraries are imported inside functions so `skills list/lint` stay fast.
"""

from __future__ import annotations


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
