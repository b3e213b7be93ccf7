"""The sft skill on the real pipeline: prepared data -> tokenizer -> pretrained tiny model -> SFT.

Numbers are computed here with skillbook.ml.evaluate, not read from the run's logs: SFT must lift
held-out exact match clearly above the pretrained base; the merged model must reload with
AutoModelForCausalLM and the adapter with PEFT, both giving the same logits; bad input must fail
fast with one clear message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, output, run_skill
from skillbook.errors import ConfigError

torch = pytest.importorskip("torch", reason="sft needs torch, trl and peft (the `train` extra)")


def sft_result(prepared: dict, pretrained_model: Path, session_runs: Path) -> dict:
    """The default sft run on the session's pretrained model, run once and shared by test_dpo/test_grpo."""
    sets = {
        "model": str(pretrained_model),
        "data": str(output(prepared, "sft_data")),
        "eval_data": str(output(prepared, "eval_data")),
    }
    for done in sorted((session_runs / "sft").glob("*/outputs.json")):
        result = json.loads(done.read_text())
        config = (done.parent / "config.yaml").read_text()
        if all(f"{k}: {v}" in config for k, v in sets.items()):
            return result
    return run_skill("sft", session_runs, sets)


@pytest.fixture(scope="module")
def sft_run(prepared, pretrained_model, session_runs) -> dict:
    return sft_result(prepared, pretrained_model, session_runs)


def eval_rows(prepared: dict) -> list[dict]:
    from skillbook.ml.evaluate import read_jsonl

    return read_jsonl(output(prepared, "eval_data") / "test.jsonl")


def test_sft_raises_held_out_exact_match(sft_run, prepared, pretrained_model):
    from skillbook.ml.evaluate import exact_match, load_model_and_tokenizer

    rows = eval_rows(prepared)
    base, tok = load_model_and_tokenizer(pretrained_model)
    tuned, tok2 = load_model_and_tokenizer(output(sft_run, "model"))
    before = exact_match(base, tok, rows)["exact_match"]
    after = exact_match(tuned, tok2, rows)["exact_match"]
    # Measured on the 300-step pretraining default: 0.009 -> 0.478 on 222 held-out questions. The base knows
    # the facts (statement cloze ~0.99) but never answers in the Question/Answer format; SFT teaches the format.
    assert after >= before + 0.3, f"held-out exact match {before:.3f} -> {after:.3f}"
    assert sft_run["summary"]["train_loss_last"] < sft_run["summary"]["train_loss_first"]


def test_merged_model_and_adapter_reload_with_equal_logits(sft_run, pretrained_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir, adapter_dir = output(sft_run, "model"), output(sft_run, "adapter")
    assert sft_run["outputs"]["model"]["kind"] == "hf-model" and sft_run["outputs"]["adapter"]["kind"] == "adapter"
    tok = AutoTokenizer.from_pretrained(merged_dir)  # the merged model carries its tokenizer
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_model), adapter_dir).eval()
    ids = tok(["Question: Where does Mira live?\nAnswer:", "Mira has a red kite."], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = merged(**ids).logits, adapted(**ids).logits
    mask = ids["attention_mask"].bool()
    assert torch.allclose(a[mask], b[mask], atol=1e-4), (a - b).abs().max()
    # the adapter really changed the model: the base alone gives different logits
    base = AutoModelForCausalLM.from_pretrained(pretrained_model).eval()
    with torch.no_grad():
        assert (base(**ids).logits - a).abs().max() > 1e-2


def test_missing_model_fails_fast_with_one_message(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from skillbook.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(main, ["run", "sft", "--set", "model=does/not-exist", "--runs-dir", str(tmp_path)])
    assert res.exit_code != 0
    text = res.output + (str(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else "")
    assert "model" in text and "does/not-exist" in text
    assert "Traceback" not in text
    assert not (tmp_path / "sft").exists()  # refused before a run directory was made


def test_sft_data_missing_completion_fails_before_model_load(tmp_path):
    bad = tmp_path / "bad-sft"
    bad.mkdir()
    (bad / "train.jsonl").write_text(json.dumps({"prompt": "Question: hi\nAnswer:", "answer": " x"}) + "\n")
    model_dir = tmp_path / "not-a-model"  # exists but holds no model: the data check must come first
    model_dir.mkdir()
    with pytest.raises(ConfigError) as info:
        run_skill("sft", tmp_path / "runs", {"model": str(model_dir), "data": str(bad), "eval_data": str(bad)})
    msg = str(info.value)
    assert "train.jsonl" in msg and "'completion'" in msg


def test_presets_validate_and_tiny_default_has_no_checkpointing():
    from skillbook.run import recipe

    rec = recipe.load(ROOT / "skills" / "sft")
    cfg = recipe.resolve(rec, overrides={"model": "/x"})
    assert cfg.gradient_checkpointing is False and cfg.method == "lora"
    for preset in rec.presets():
        assert recipe.resolve(rec, preset=preset, overrides={"model": "/x"}).lr <= 2e-4
