"""speculative-decoding: greedy output with a draft or prompt lookup is the target's own, token for token.

Verification keeps a proposed token only where it equals the target's argmax, and the token after the last
match is the target's own, so greedy speculation cannot change the output: the tests compute the target's
greedy tokens alone and with each method and compare them. The recipe test reuses the session's pretrained
model as the target and trains a 1-layer draft for a few steps through the pretraining skill.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import output, run_skill
from families import FAMILIES, build_family_model, train_llama3_tokenizer
from skillbook.ml import speculative as sp

PROMPTS = ["Mira lives in", "Question: What colour is Mira's kite?\nAnswer:", "The baker of Ashby has a pet"]


def _ids(tok, text: str) -> list[int]:
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def assert_identical(target, draft, tok, new_tokens: int = 16) -> None:
    sp.configure_draft(draft, 5, 0.0)  # always propose 5: the most verification work per round
    for text in PROMPTS:
        prompt = _ids(tok, text)
        alone = sp.generate(target, prompt, new_tokens)
        assisted = sp.generate(target, prompt, new_tokens, draft=draft)
        lookup = sp.generate(target, prompt, new_tokens, lookup=3)
        assert len(alone.tokens) == new_tokens and alone.passes == new_tokens and alone.proposed == 0
        assert assisted.tokens == alone.tokens, text
        assert lookup.tokens == alone.tokens, text
        assert 0 <= assisted.accepted <= assisted.proposed and assisted.passes <= new_tokens


def test_greedy_speculation_is_the_targets_output(pretrained_model, tmp_path):
    """The trained target with a random 1-layer draft (low acceptance, many rejections) and prompt lookup."""
    target, tok = _load(pretrained_model)
    draft, _ = _load(build_family_model("llama", pretrained_model, tmp_path / "draft", seed=1, layers=1))
    assert_identical(target, draft, tok)
    # a copy of the target as its draft accepts every proposal: 4 per round + 1 of the target's = 5 per pass
    twin, _ = _load(pretrained_model)  # another instance: the pass counter hooks the target object only
    sp.configure_draft(twin, 4, 0.0)
    self_draft = sp.generate(target, _ids(tok, PROMPTS[0]), 24, draft=twin)
    assert self_draft.tokens == sp.generate(target, _ids(tok, PROMPTS[0]), 24).tokens
    # up to 4 drafted + 1 of the target's per pass: 5 passes where the draft proposes 4 every round (Zen 3
    # AVX2), 6 where it proposes fewer near the end (Zen 4 AVX-512); either way far below 24
    assert self_draft.accepted == self_draft.proposed > 0 and self_draft.passes <= 6


def test_recipe_reports_acceptance_and_speeds(pretrained_model, prepared, tmp_path):
    res = run_skill(
        "speculative-decoding",
        tmp_path,
        {
            "model": str(pretrained_model),
            "corpus": str(output(prepared, "corpus")),
            "draft_steps": 30,
            "prompts": 3,
            "new_tokens": 16,
            "rounds": 1,
        },
    )
    s = res["summary"]
    assert 0.0 <= s["acceptance_rate"] <= 1.0 and 0.0 <= s["lookup_acceptance_rate"] <= 1.0
    assert s["target_tokens_per_s"] > 0 and s["assisted_tokens_per_s"] > 0 and s["lookup_tokens_per_s"] > 0
    assert s["identical"] is True and s["tokens_per_pass"] >= 1.0
    assert s["draft_params"] < s["target_params"]
    rows = {r["method"]: r for r in json.loads((Path(res["run_dir"]) / "speculative.json").read_text())}
    assert rows["target + draft (assisted)"]["proposed"] > 0
    if "llama.cpp + prompt lookup" in rows:  # llama-cpp-python installed: the GGUF rows agree too
        assert rows["llama.cpp + prompt lookup"]["identical"] is True
        assert 0.0 <= rows["llama.cpp + prompt lookup"]["acceptance_rate"] <= 1.0
    assert "| target + draft (assisted) |" in output(res, "report").read_text()
    assert (Path(res["run_dir"]) / "draft" / "outputs.json").is_file()  # trained by the pretraining skill


def test_refuses_a_draft_on_another_tokenizer(pretrained_model, prepared, tmp_path):
    from skillbook.errors import ConfigError

    texts = [json.loads(line)["text"] for line in (output(prepared, "corpus") / "train.jsonl").open()][:300]
    other = build_family_model("llama", train_llama3_tokenizer(texts, tmp_path / "tok", 300), tmp_path / "other")
    with pytest.raises(ConfigError, match=r"draft: its tokenizer differs .*draft=.*other.*model=") as err:
        run_skill("speculative-decoding", tmp_path / "runs", {"model": str(pretrained_model), "draft": str(other)})
    assert str(pretrained_model) in str(err.value)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.gguf"))  # nothing measured


@pytest.mark.family_matrix("speculative-decoding")
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_decoding_on_family(family, family_model, tmp_path):
    """A 2-layer target and a 1-layer draft of the same family and tokenizer: greedy output unchanged."""
    target_dir = family_model(family)
    target, tok = _load(target_dir)
    draft, _ = _load(build_family_model(family, target_dir, tmp_path / "draft", seed=1, layers=1))
    assert_identical(target, draft, tok)
