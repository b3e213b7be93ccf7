"""The rlhf skill on the real pipeline: pretrained tiny model -> sft -> reward model -> RLOO against it.

The test reloads the tuned policy with AutoModelForCausalLM and the reward model with
AutoModelForSequenceClassification, answers the held-out questions greedily itself, scores the answers with
the reward model, and requires the mean score to rise while exact match drops by at most EM_MARGIN; a causal
LM passed as the reward model and a batch that cannot hold whole groups are refused before anything trains.
The family matrix runs a few RLOO steps on every family's tiny model against the same reward model (every
family carries the session tokenizer, and the reward model scores text anyway).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import output, run_skill
from families import FAMILIES
from skillbook.errors import ConfigError

torch = pytest.importorskip("torch", reason="rlhf needs torch, trl and peft (the `train` extra)")

EM_MARGIN = 0.08  # held-out exact match may fall by at most this much (SKILL.md states the same margin)


@pytest.fixture(scope="module")
def reward_model(reward_model_run) -> Path:
    """The session's reward-modeling default on the sft model (held-out pairwise accuracy 0.745: the reward
    model the SKILL.md numbers were measured with)."""
    return output(reward_model_run, "model")


@pytest.fixture(scope="module")
def rlhf_run(prepared, sft_model, reward_model, session_runs) -> dict:
    sets = {
        "model": str(sft_model),
        "reward_model": str(reward_model),
        "data": str(output(prepared, "sft_data")),
        "eval_data": str(output(prepared, "eval_data")),
    }
    return run_skill("rlhf", session_runs, sets)


def heldout(policy_dir: Path, reward_dir: Path, rows: list[dict]) -> tuple[float, float]:
    """(mean reward-model score, exact match) of the policy's greedy answers, computed here from the saved dirs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from skillbook.ml.evaluate import answer_matches, generate_answers

    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    answers = generate_answers(policy, tok, [r["prompt"] for r in rows], max_new_tokens=8, batch_size=64)
    rm_tok = AutoTokenizer.from_pretrained(reward_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    texts = [r["prompt"] + a + rm_tok.eos_token for r, a in zip(rows, answers)]  # eos-terminated, as trained
    batch = rm_tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = rm(**batch).logits[:, 0]
    return scores.mean().item(), sum(answer_matches(a, r["completion"]) for a, r in zip(answers, rows)) / len(rows)


def test_rlhf_raises_heldout_reward_and_keeps_exact_match(rlhf_run, sft_model, reward_model, prepared):
    from skillbook.ml.evaluate import read_jsonl

    rows = read_jsonl(output(prepared, "eval_data") / "test.jsonl")[:300]  # the recipe's eval_limit
    reward_before, em_before = heldout(sft_model, reward_model, rows)
    reward_after, em_after = heldout(output(rlhf_run, "model"), reward_model, rows)
    assert reward_after > reward_before + 0.05, f"held-out reward {reward_before:.3f} -> {reward_after:.3f}"
    assert em_after >= em_before - EM_MARGIN, f"held-out exact match {em_before:.3f} -> {em_after:.3f}"
    s = rlhf_run["summary"]  # the recipe's own numbers agree (other batching may flip a greedy tie or two)
    assert s["heldout_rm_score_after"] == pytest.approx(reward_after, abs=0.02)
    assert s["heldout_exact_match_before"] == pytest.approx(em_before, abs=0.01)
    assert 0 < s["kl_to_reference"] < 10 and math.isfinite(s["kl_per_token"])


def test_rlhf_policy_reloads_and_merge_is_faithful(rlhf_run, sft_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(output(rlhf_run, "model")).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_model), output(rlhf_run, "adapter"))
    tok = AutoTokenizer.from_pretrained(output(rlhf_run, "model"))
    ids = tok(["Question: Where does Mira live?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, adapted.eval()(**ids).logits, atol=1e-4)
    assert merged.config.model_type == "llama" and rlhf_run["summary"]["merge_max_logit_diff"] <= 1e-4
    assert "| reward-model score |" in (Path(rlhf_run["run_dir"]) / "report.md").read_text()


def test_causal_lm_as_reward_model_is_refused_before_training(sft_model, tmp_path):
    with pytest.raises(ConfigError, match=r"reward_model: .* is not a reward model .*skills run reward-modeling"):
        run_skill("rlhf", tmp_path / "runs", {"model": str(sft_model), "reward_model": str(sft_model)})
    assert not list((tmp_path / "runs").rglob("*.safetensors"))  # nothing trained or saved


def test_incomplete_groups_refused_at_validation(tmp_path):
    with pytest.raises(ConfigError, match="num_generations"):
        run_skill("rlhf", tmp_path, {"batch_size": 30, "num_generations": 4})
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def few_prompts(prepared, tmp_path_factory) -> Path:
    """16 train and 4 held-out rows: the family cells check that RLOO runs on the family, not how well it learns."""
    src, out = output(prepared, "sft_data"), tmp_path_factory.mktemp("rlhf-prompts")
    for split, n in (("train", 16), ("test", 4)):
        (out / f"{split}.jsonl").write_text("".join((src / f"{split}.jsonl").read_text().splitlines(True)[:n]))
    return out


@pytest.mark.family_matrix("rlhf")
@pytest.mark.parametrize("family", FAMILIES)
def test_rlhf_on_family(family, family_model, reward_model, few_prompts, tmp_path, record_property):
    """3 RLOO steps on the family's random-init model: the weights move, the KL to the start is finite and
    positive, and the tuned policy reloads as the same family."""
    from transformers import AutoModelForCausalLM

    base = family_model(family)
    sets = {
        "model": str(base),
        "reward_model": str(reward_model),
        "data": str(few_prompts),
        "steps": 3,
        "batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 4,
        "eval_limit": 4,
        "kl_prompts": 4,
        "logging": {"every": 1},
    }
    try:
        res = run_skill("rlhf", tmp_path, sets)
    except ConfigError as err:  # a family RLOO cannot train faithfully is refused with one message
        record_property("support_reason", str(err))
        assert family in str(err)
        return
    tuned = AutoModelForCausalLM.from_pretrained(output(res, "model")).eval()
    start = AutoModelForCausalLM.from_pretrained(base).eval()
    assert tuned.config.model_type == json.loads((base / "config.json").read_text())["model_type"]
    theirs = dict(start.named_parameters())
    moved = max((p - theirs[n]).abs().max().item() for n, p in tuned.named_parameters() if n in theirs)
    assert moved > 0, "RLOO steps left every weight unchanged"
    kl = res["summary"]["kl_to_reference"]
    assert math.isfinite(kl) and kl > 0, kl
