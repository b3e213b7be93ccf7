"""long-context: at 4x the trained context, YaRN plus a short fine-tune beats the unscaled model on
perplexity and on passkey retrieval, which the unscaled model loses past its context.

The recipe saves the base and the fine-tuned models; the test reloads them with AutoModelForCausalLM and
computes perplexity and passkey accuracy itself (skillbook.ml.long_context on the corpus's val split, on
passkey prompts the recipe never built), so what it asserts is not the recipe's own summary.
"""

from __future__ import annotations

import pytest

from conftest import output, run_skill
from families import FAMILIES

TINY = {"eval_windows": 4, "passkey_trials": 12}  # the default task and fine-tune steps: the effect needs them


def _measure(model_dir, corpus, length: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml import lm_data
    from skillbook.ml import long_context as lc
    from skillbook.ml.data_files import corpus_sources

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _, val, _ = corpus_sources(corpus, "corpus", 0.05, 0)
    tokens = lm_data.tokenize_texts(tok, val)
    maker = lc.PasskeyMaker(tok, tokens, seed=123)  # prompts the recipe never built
    return lc.perplexity_at(model, tokens, length, 4, "cpu"), lc.passkey_accuracy(model, maker, length, 32, "cpu")


@pytest.fixture(scope="module")
def extended(pretrained_model, prepared, tmp_path_factory):
    sets = {"model": str(pretrained_model), "corpus": str(output(prepared, "corpus")), "methods": ["none", "yarn"]}
    return run_skill("long-context", tmp_path_factory.mktemp("long-context"), {**sets, **TINY})


def test_scaling_and_finetuning_at_4x(extended, prepared):
    """At 4x the trained context, YaRN + the fine-tune beats no scaling on both numbers: lower perplexity and
    passkey retrieval the unscaled model loses past its own context (which it still has at 1x)."""
    from transformers import AutoConfig

    corpus = output(prepared, "corpus")
    scaled, base = output(extended, "model"), output(extended, "base_model")
    rope = AutoConfig.from_pretrained(scaled).rope_parameters
    assert rope["rope_type"] == "yarn" and rope["beta_fast"] == 8.0  # context 128 / 16: the fast pairs stay
    short, n = extended["summary"]["lengths"][0], extended["summary"]["lengths"][-1]
    assert n == 4 * short
    ppl_base, key_base = _measure(base, corpus, n)
    ppl_scaled, key_scaled = _measure(scaled, corpus, n)
    _, key_short = _measure(base, corpus, short)
    assert key_short > 0.8, key_short  # the base has the task at its own context
    assert ppl_scaled < ppl_base - 0.2, (ppl_scaled, ppl_base)
    assert key_scaled > max(key_base + 0.3, 0.8), (key_scaled, key_base)


def test_yarn_beta_fast_follows_the_context():
    """YaRN's beta_fast is the paper's 32 from 512 tokens up, context/16 below (the pairs under 16 tokens of
    wavelength keep their frequency), and an explicit value wins."""
    from transformers import LlamaConfig

    from skillbook.ml import long_context as lc

    for context, want in ((128, 8.0), (512, 32.0), (4096, 32.0)):
        config = LlamaConfig(max_position_embeddings=context, hidden_size=64, num_attention_heads=2)
        assert lc.scaled_config(config, "yarn", 4.0).rope_parameters["beta_fast"] == want
    assert lc.scaled_config(config, "yarn", 4.0, beta_fast=16.0).rope_parameters["beta_fast"] == 16.0


def test_refuses_learned_positions(family_model, tmp_path):
    from skillbook.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model: gpt2 has learned absolute position embeddings"):
        run_skill("long-context", tmp_path, {"model": str(family_model("gpt2"))})
    assert not list(tmp_path.rglob("*.safetensors"))


def test_keep_must_be_measured(tmp_path):
    from skillbook.errors import ConfigError

    with pytest.raises(ConfigError, match="keep"):
        run_skill("long-context", tmp_path, {"methods": ["none", "linear"], "keep": "yarn"})


@pytest.fixture(scope="module")
def small_corpus(prepared, tmp_path_factory):
    """300 train and 60 val documents: a family cell trains 2 steps, so tokenising the whole corpus would
    cost more than the check."""
    src, out = output(prepared, "corpus"), tmp_path_factory.mktemp("small-corpus")
    for name, n in (("train.jsonl", 300), ("val.jsonl", 60)):
        (out / name).write_text("".join((src / name).read_text().splitlines(keepends=True)[:n]))
    return out


@pytest.mark.family_matrix("long-context")
@pytest.mark.parametrize("family", FAMILIES)
def test_long_context_on_family(family, family_model, small_corpus, tmp_path, record_property):
    """Every rotary family whose config takes them runs each scaling through rope_parameters and fine-tunes a
    few steps at 2x; gpt2 (learned positions) and phi3 (longrope only) are refused with the reason."""
    from transformers import AutoModelForCausalLM

    from skillbook.errors import ConfigError

    sets = {
        "model": str(family_model(family)),
        "corpus": str(small_corpus),
        "factor": 2.0,
        "task_steps": 0,
        "finetune_steps": 2,
        "batch_size": 2,
        "eval_windows": 1,
        "passkey_trials": 1,
    }
    try:
        res = run_skill("long-context", tmp_path, sets)
    except ConfigError as err:  # learned absolute positions: refused with the reason
        record_property("support_reason", str(err))
        assert "rotary" in str(err) or "longrope" in str(err)
        return
    s = res["summary"]
    for method in ("none", "linear", "dynamic", "yarn"):
        assert s[f"{method}_finetuned_{s['lengths'][-1]}_ppl"] < float("inf")
    model = AutoModelForCausalLM.from_pretrained(output(res, "model"))
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.max_position_embeddings == 2 * s["lengths"][0]
