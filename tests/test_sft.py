"""The sft skill on the real pipeline: prepared data -> tokenizer -> pretrained tiny model -> SFT.

Numbers are computed here with skillbook.ml.evaluate, not read from the run's logs: SFT must lift
held-out exact match clearly above the pretrained base; the merged model must reload with
AutoModelForCausalLM and the adapter with PEFT, both giving the same logits; bad input must fail
fast with one clear message.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, output, run_skill, tiny_model_dir
from skillbook.errors import ConfigError

torch = pytest.importorskip("torch", reason="sft needs torch, trl and peft (the `train` extra)")


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
    # Measured on the 300-step pretraining default, 222 held-out questions: 0.009 -> 0.478 on a Zen 3 (AVX2),
    # 0.000 -> 0.180 on a Zen 4 (AVX-512) CPU, fp32 both: the fp32 kernels differ, so the tiny models do. The
    # base knows the facts (statement cloze ~0.99) but never answers in the Question/Answer format.
    assert after >= before + 0.15, f"held-out exact match {before:.3f} -> {after:.3f}"
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
    model_dir = tiny_model_dir(tmp_path / "model")  # loads: the data check behind the input check is reached
    with pytest.raises(ConfigError) as info:
        run_skill("sft", tmp_path / "runs", {"model": str(model_dir), "data": str(bad)})
    msg = str(info.value)
    assert "train.jsonl" in msg and "'completion'" in msg


def test_presets_validate_and_tiny_default_has_no_checkpointing():
    from skillbook.run import recipe

    rec = recipe.load(ROOT / "skills" / "sft")
    cfg = recipe.resolve(rec, overrides={"model": "/x"})
    assert cfg.gradient_checkpointing is False and cfg.method == "lora"
    for preset in rec.presets():
        assert recipe.resolve(rec, preset=preset, overrides={"model": "/x"}).optim.lr <= 2e-4


def test_a_partial_block_keeps_the_recipes_other_defaults():
    """`--set optim.lr=…` changes one value: the rest of the block keeps this recipe's defaults (dpo warms
    up for 0.1 of its steps, not the Optim class's 0.05), and a flat pre-block key names its new place."""
    from skillbook.run import recipe

    rec = recipe.load(ROOT / "skills" / "dpo")
    cfg = recipe.resolve(rec, overrides={"model": "/x", "lora": {"dropout": 0.05}}, sets=["optim.lr=1e-4", "lora.r=8"])
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.schedule) == (1e-4, 0.1, "cosine")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32, 0.05)
    with pytest.raises(ConfigError) as info:
        recipe.resolve(rec, overrides={"model": "/x"}, sets=["lr=1e-4", "lora_r=8", "optim.max_grad_norm=0.5"])
    msg = str(info.value)
    assert "'optim.lr'" in msg and "'lora.r'" in msg and "'optim.grad_clip'" in msg


def test_trl_args_at_the_defaults_are_what_trl_ran_before_the_blocks():
    """The blocks made trl_args' fixed choices fields; at the defaults TRL must get the same values."""
    from trl import SFTConfig

    from skillbook.ml.posttrain import trl_args
    from skillbook.run import recipe

    expected = {  # skill: (learning_rate, warmup_steps = ceil(ratio x steps), logging_steps)
        "sft": (2e-3, 6, 5),
        "dpo": (2e-3, 8, 5),
        "grpo": (1e-3, 2, 2),
        "reward-modeling": (5e-4, 20, 5),
    }
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    for name, (lr, warmup, every) in expected.items():
        cfg = recipe.resolve(recipe.load(ROOT / "skills" / name), overrides={"model": "/x"})
        args = trl_args(cfg, ROOT / "unused")
        assert (args["learning_rate"], args["warmup_steps"], args["logging_steps"]) == (lr, warmup, every), name
        assert args["lr_scheduler_type"] == "cosine" and args["weight_decay"] == 0.0 and args["report_to"] == []
        assert (args["adam_beta1"], args["adam_beta2"], args["max_grad_norm"]) == (0.9, 0.999, 1.0)
        assert (args["bf16"], args["fp16"]) == (bf16, False)
    built = SFTConfig(**trl_args(cfg, ROOT / "unused"))  # TRL accepts every key
    assert built.max_grad_norm == 1.0 and built.bf16 is bf16


def test_schema_shows_each_recipes_block_defaults():
    """Editors and the site read a block field's default from the schema's $defs: it must be this recipe's."""
    from skillbook.run import recipe

    for name, lr in {"sft": 2e-3, "grpo": 1e-3, "reward-modeling": 5e-4}.items():
        schema = recipe.load(ROOT / "skills" / name).Config.model_json_schema()
        assert schema["$defs"]["Optim"]["properties"]["lr"]["default"] == lr
        assert schema["properties"]["optim"]["default"]["lr"] == lr
