"""transformer-from-scratch: the one-file model is a Llama (same logits as transformers' LlamaForCausalLM on
the same weights), its attention is a causal distribution, and the recipe's short runs lower held-out loss
with either tokenizer and every positional encoding."""

from __future__ import annotations

import json

import pytest

from conftest import output, run_skill

TINY = {"steps": 50, "batch_size": 8, "seq_len": 64, "eval_every": 50, "eval_windows": 8, "samples": 1}
TINY |= {"sample_tokens": 8, "plot_tokens": 12}


@pytest.mark.parametrize(
    ("seed", "n_kv", "length", "tied"), [(0, 2, 17, False), (1, 4, 40, True), (2, 1, 1, False), (3, 2, 64, False)]
)
def test_logits_equal_llama(seed, n_kv, length, tied):
    """Random Llama weights (GQA, rope_theta 5e5, rms eps 1e-5) loaded through from_llama_state_dict give
    LlamaForCausalLM's logits within 1e-5 in fp32; and the mapping runs the other way too."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from skillbook.ml import scratch_transformer as st

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=n_kv, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=tied,
    )  # fmt: skip
    llama = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init, so the logits are O(1) and the check has teeth
        for p in llama.parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    cfg = st.ScratchConfig.from_llama(hf_cfg)
    assert (cfg.n_kv_head, cfg.rope_theta, cfg.tie_embeddings) == (n_kv, 500000.0, tied)
    model = st.Transformer(cfg).eval()
    model.load_state_dict(st.from_llama_state_dict(llama.state_dict()))  # strict: every tensor, every shape
    x = torch.randint(0, 97, (2, length))
    with torch.no_grad():
        ref, ours = llama(input_ids=x).logits, model(x)
    assert ref.abs().max() > 1.0
    assert (ref - ours).abs().max() < 1e-5
    fresh = LlamaForCausalLM(hf_cfg).eval()  # ours -> Llama names: the same logits again
    fresh.load_state_dict({k: model.state_dict()[st.our_name(k)] for k in fresh.state_dict()})
    with torch.no_grad():
        assert (fresh(input_ids=x).logits - ours).abs().max() < 1e-5


@pytest.mark.parametrize("positional", ["rope", "learned", "sinusoidal"])
def test_attention_is_a_causal_distribution(positional):
    import torch

    from skillbook.ml import scratch_transformer as st

    torch.manual_seed(0)
    model = st.Transformer(st.ScratchConfig(vocab_size=50, n_kv_head=2, positional=positional)).eval()
    with torch.no_grad():
        for p in model.parameters():  # sharper than the init, so masked entries would show
            p.normal_(0, 0.3)
        logits, attns = model(torch.randint(0, 50, (2, 20)), return_attn=True)
    assert logits.shape == (2, 20, 50) and len(attns) == 2
    for probs in attns:
        assert probs.shape == (2, 4, 20, 20)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 20), atol=1e-6)
        assert probs.triu(1).abs().max() == 0  # no query reads a later key
        assert probs[..., torch.ones(20, 20, dtype=torch.bool).tril()].min() > 0  # every earlier key has weight
    ids = model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert ids.shape == (1, 8) and ids[0, :3].tolist() == [1, 2, 3]


def _check_run(res: dict) -> dict:
    s = res["summary"]
    assert s["val_loss_last"] < s["val_loss_first"] - 0.5, s  # training lowered the held-out loss
    png = output(res, "attention").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert (output(res, "model") / "model.safetensors").is_file()
    return s


def test_char_recipe_lowers_loss_and_matches_llama(prepared, tmp_path):
    """The default shape (char, rope) for 50 steps; its trained weights give LlamaForCausalLM's logits,
    and the saved safetensors reload into the scratch model."""
    import torch
    from safetensors.torch import load_model

    from skillbook.ml import scratch_transformer as st

    res = run_skill("transformer-from-scratch", tmp_path, {"corpus": str(output(prepared, "corpus")), **TINY})
    s = _check_run(res)
    assert s["vocab_size"] < 100 and s["llama_max_abs_diff"] < 1e-4  # trained logits are larger: same rounding
    saved = output(res, "model")
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg.pop("tokenizer") == "char"
    model = st.Transformer(st.ScratchConfig(**cfg))
    load_model(model, str(saved / "model.safetensors"))
    tok = st.CharTokenizer("".join(json.loads((saved / "vocab.json").read_text())[2:]))
    assert tok.decode(tok.encode("Mira lives in Ashby.")) == "Mira lives in Ashby."
    assert model(torch.tensor([tok.encode("Mira lives")])).shape == (1, 10, cfg["vocab_size"])


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_other_positional_encodings_train(positional, prepared, tmp_path):
    sets = {"corpus": str(output(prepared, "corpus")), "positional": positional, **TINY}
    s = _check_run(run_skill("transformer-from-scratch", tmp_path, sets))
    assert s["llama_max_abs_diff"] is None  # not a Llama: no check to run


def test_bpe_tokenizer_trains(prepared, tokenizer_dir, tmp_path):
    sets = {"corpus": str(output(prepared, "corpus")), "tokenizer": "bpe", "tokenizer_dir": str(tokenizer_dir)}
    res = run_skill("transformer-from-scratch", tmp_path, {**sets, **TINY, "tie_embeddings": True, "n_kv_head": 2})
    s = _check_run(res)
    assert s["vocab_size"] > 500 and s["llama_max_abs_diff"] < 1e-4
    assert (output(res, "model") / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("sets", "field"),
    [
        ({"d_model": 66, "n_head": 4}, "d_model: 66 is not divisible by n_head=4"),
        ({"n_head": 4, "n_kv_head": 3}, "n_kv_head: 3 does not divide n_head=4"),
        ({"d_model": 60, "n_head": 4}, "d_model: head size 15 is odd"),
        ({"tokenizer_dir": "/tmp"}, "tokenizer_dir: only used with tokenizer=bpe"),
    ],
)
def test_bad_shapes_fail_before_training(sets, field, tmp_path):
    from skillbook.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        run_skill("transformer-from-scratch", tmp_path, sets)
    assert not list(tmp_path.rglob("*"))  # refused at config resolution: no run dir, no data, no weights
