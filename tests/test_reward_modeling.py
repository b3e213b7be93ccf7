"""The reward-modeling skill on the real pipeline: pretrained tiny model -> sft -> reward model.

The test scores held-out preference pairs itself with the saved model (reloaded through
AutoModelForSequenceClassification) and requires chosen to outrank rejected well above chance.
"""

from __future__ import annotations

import json

import pytest

from conftest import output, run_skill, tiny_model_dir
from skillbook.errors import ConfigError

torch = pytest.importorskip("torch", reason="reward-modeling needs torch and trl (the `train` extra)")


@pytest.fixture(scope="module")
def rm_run(reward_model_run) -> dict:
    return reward_model_run


def test_reward_model_ranks_held_out_pairs_above_chance(rm_run, prepared):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from skillbook.ml.evaluate import read_jsonl

    path = output(rm_run, "model")
    assert rm_run["outputs"]["model"]["kind"] == "hf-model"
    tok = AutoTokenizer.from_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    rows = read_jsonl(output(prepared, "preference_data") / "test.jsonl")

    def scores(texts):
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return rm(**batch).logits[:, 0]

    chosen = scores([r["prompt"] + r["chosen"] + tok.eos_token for r in rows])  # scored as trained: eos-terminated
    rejected = scores([r["prompt"] + r["rejected"] + tok.eos_token for r in rows])
    accuracy = (chosen > rejected).float().mean().item()
    assert accuracy >= THRESHOLD, f"held-out pairwise accuracy {accuracy:.3f} over {len(rows)} pairs"
    assert abs(accuracy - rm_run["summary"]["pairwise_accuracy"]) < 1e-6  # the summary reports the same number


def test_missing_rejected_column_fails_before_model_load(tmp_path):
    bad = tmp_path / "prefs"
    bad.mkdir()
    (bad / "train.jsonl").write_text(
        json.dumps({"prompt": "Question: Who owns Pip?\nAnswer:", "chosen": " Mira"}) + "\n"
    )
    empty_model = tiny_model_dir(tmp_path / "model")  # loads: the data check behind the input check is reached
    with pytest.raises(ConfigError) as info:
        run_skill("reward-modeling", tmp_path / "runs", {"model": str(empty_model), "data": str(bad)})
    assert str(bad / "train.jsonl") in str(info.value) and "'rejected'" in str(info.value)


THRESHOLD = 0.6  # 282 held-out pairs: 0.745-0.787 on Zen 3 AVX2, 0.638 on Zen 4 AVX-512 (0.39-0.52 untrained head)
