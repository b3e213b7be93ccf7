"""The dpo skill on the real pipeline: pretrained tiny model -> sft -> dpo on the embedded pairs.

Held-out preference accuracy (log p(chosen) > log p(rejected) on preference test.jsonl) is computed
here with skillbook.ml.evaluate for the SFT model and the DPO model; DPO must raise it. The merged
model reloads with AutoModelForCausalLM, the adapter with PEFT; a pair file without `rejected`
fails before any model is loaded, naming the file and the column.
"""

from __future__ import annotations

import json

import pytest

from conftest import output, run_skill, tiny_model_dir
from skillbook.errors import ConfigError

torch = pytest.importorskip("torch", reason="dpo needs torch, trl and peft (the `train` extra)")


@pytest.fixture(scope="module")
def dpo_run(prepared, sft_model, session_runs) -> dict:
    return run_skill(
        "dpo",
        session_runs,
        {
            "model": str(sft_model),
            "data": str(output(prepared, "preference_data")),
            "eval_data": str(output(prepared, "eval_data")),
        },
    )


def held_out_preferences(prepared, sft_model, dpo_run) -> tuple[dict, dict]:
    from skillbook.ml.evaluate import load_model_and_tokenizer, preference_accuracy, read_jsonl

    rows = read_jsonl(output(prepared, "preference_data") / "test.jsonl")
    sft, tok = load_model_and_tokenizer(sft_model)
    dpo, tok2 = load_model_and_tokenizer(output(dpo_run, "model"))
    return preference_accuracy(sft, tok, rows), preference_accuracy(dpo, tok2, rows)


def test_dpo_widens_held_out_preference_margin(dpo_run, prepared, sft_model):
    before, after = held_out_preferences(prepared, sft_model, dpo_run)
    # Measured on two pipeline runs: mean margin 0.85 -> 0.99 and 1.16 -> 1.72 nats on 282 held-out pairs.
    assert after["mean_margin"] > before["mean_margin"] + 0.05, (before, after)


def test_dpo_raises_held_out_preference_accuracy(dpo_run, prepared, sft_model):
    before, after = held_out_preferences(prepared, sft_model, dpo_run)
    # Measured: 0.901 -> 0.936 on 282 held-out pairs (the speedrun's models); the SFT model's remaining errors
    # are mostly arithmetic it never stored (DPO cannot add knowledge) and echoed names on reading questions.
    assert after["preference_accuracy"] > before["preference_accuracy"], (before, after)


def test_dpo_keeps_greedy_answers_right(dpo_run, prepared, sft_model):
    """Plain DPO lowers the chosen answers' likelihood too and greedy answers degrade (0.518 -> 0.305
    measured; 0.478 -> 0.608 with the NLL term); the default adds an NLL term on the chosen answer
    (sft_weight 1.0), which keeps them."""
    from skillbook.ml.evaluate import exact_match, load_model_and_tokenizer, read_jsonl

    rows = read_jsonl(output(prepared, "eval_data") / "test.jsonl")
    sft, tok = load_model_and_tokenizer(sft_model)
    dpo, tok2 = load_model_and_tokenizer(output(dpo_run, "model"))
    before, after = exact_match(sft, tok, rows)["exact_match"], exact_match(dpo, tok2, rows)["exact_match"]
    assert after >= before - 0.02, f"held-out exact match {before:.3f} -> {after:.3f}"


def test_dpo_outputs_reload(dpo_run, sft_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(output(dpo_run, "model"))
    merged = AutoModelForCausalLM.from_pretrained(output(dpo_run, "model")).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(sft_model), output(dpo_run, "adapter")
    ).eval()
    ids = tok(["Question: Who owns Pip?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, adapted(**ids).logits, atol=1e-4)
    assert dpo_run["summary"]["merge_max_logit_diff"] <= 1e-4


def test_missing_rejected_column_fails_before_model_load(tmp_path):
    bad = tmp_path / "prefs"
    bad.mkdir()
    row = {"prompt": "Question: Who owns Pip?\nAnswer:", "chosen": " Mira"}
    for split in ("train", "test"):
        (bad / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    empty_model = tiny_model_dir(tmp_path / "model")  # loads: the data check behind the input check is reached
    with pytest.raises(ConfigError) as info:
        run_skill("dpo", tmp_path / "runs", {"model": str(empty_model), "data": str(bad)})
    msg = str(info.value)
    assert str(bad / "train.jsonl") in msg and "'rejected'" in msg
