"""The pruning skill and skillbook.ml.pruning, on the session's pretrained model and on every family.

- unstructured: the saved model has exactly the stated share of zeros in its blocks' weight matrices
  (counted here) and reloads with AutoModelForCausalLM;
- structured MLP pruning: the saved config has the smaller intermediate_size, the real tensors have the
  smaller shapes, the parameter count and file shrink, and it reloads;
- healing lowers held-out perplexity, recomputed here with skillbook.ml.evaluate.perplexity on the
  reloaded models (the recipe's numbers must match it);
- a family whose MLP layout is unknown is refused with one ConfigError before any weights load.
"""

from __future__ import annotations

import json

import pytest

from conftest import output, run_skill
from families import FAMILIES
from skillbook.errors import ConfigError
from skillbook.ml.evaluate import perplexity, read_jsonl

torch = pytest.importorskip("torch", reason="pruning needs torch (the `train` extra)")


def matrices(model) -> list:
    """The 2-D weights of the decoder blocks: nn.Linear and GPT-2's Conv1D, not embeddings or the LM head."""
    from transformers.pytorch_utils import Conv1D

    skip = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | Conv1D) and id(m) not in skip and "lm_head" not in name
    ]


def zero_share(model) -> float:
    mats = matrices(model)
    return sum(int((w == 0).sum()) for w in mats) / sum(w.numel() for w in mats)


def mlp_shapes(model) -> set[tuple[int, ...]]:
    return {tuple(p.shape) for n, p in model.named_parameters() if ".mlp." in n and n.endswith("weight")}


def test_recipe_prunes_shrinks_and_heals(pretrained_model, prepared, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    corpus = output(prepared, "corpus")
    sets = {
        "model": str(pretrained_model),
        "corpus": str(corpus),
        "sparsities": [0.5],
        "mlp_sparsities": [0.5],
        "heal_steps": 20,
        "eval_docs": 16,
        "decode_tokens": 8,
    }
    res = run_skill("pruning", tmp_path, sets)
    s = res["summary"]
    report = json.loads(output(res, "report").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert (output(res, "report").parent / "pruning.png").stat().st_size > 1000
    texts = [row["text"] for row in read_jsonl(corpus / "val.jsonl")[:16]]  # the recipe's eval_docs
    tok = AutoTokenizer.from_pretrained(pretrained_model)
    dense = AutoModelForCausalLM.from_pretrained(pretrained_model).eval()
    dense_ppl = perplexity(dense, tok, texts, max_length=128, batch_size=8)
    assert s["dense_perplexity"] == pytest.approx(dense_ppl, rel=1e-5)

    # Unstructured: exactly half of the block weights are zero in the reloaded model, and healing helped.
    un = rows["unstructured-0.50"]
    model = AutoModelForCausalLM.from_pretrained(un["path"]).eval()
    n = sum(w.numel() for w in matrices(model))
    assert zero_share(model) == pytest.approx(round(0.5 * n) / n, abs=2 / n)
    assert sum(p.numel() for p in model.parameters()) == s["dense_params"]  # zeros are still stored
    healed = perplexity(model, tok, texts, max_length=128, batch_size=8)
    assert healed == pytest.approx(un["perplexity_healed"], rel=1e-5)
    assert un["perplexity_pruned"] > dense_ppl  # pruning half the weights costs perplexity ...
    assert healed < un["perplexity_pruned"]  # ... and healing wins it back

    # Structured: the saved config and the real tensors are half as wide; fewer parameters, smaller file.
    mlp = rows["mlp-0.50"]
    assert output(res, "model").name == "mlp-0.50"  # the output: the most pruned structured model
    dense_width = AutoConfig.from_pretrained(pretrained_model).intermediate_size
    small = AutoModelForCausalLM.from_pretrained(output(res, "model")).eval()
    hidden = small.config.hidden_size
    assert small.config.intermediate_size == dense_width // 2 == mlp["intermediate_size"]
    assert mlp_shapes(small) == {(dense_width // 2, hidden), (hidden, dense_width // 2)}
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small == mlp["params"] < s["dense_params"]
    assert n_small == s["dense_params"] - small.config.num_hidden_layers * 3 * hidden * dense_width // 2
    assert mlp["file_bytes"] < s["dense_file_bytes"]
    assert mlp["tokens_per_s"] > 0
    healed = perplexity(small, tok, texts, max_length=128, batch_size=8)
    assert healed == pytest.approx(mlp["perplexity_healed"], rel=1e-5)
    assert healed < mlp["perplexity_pruned"]


@pytest.mark.family_matrix("pruning")
@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_on_family(family, family_model, prepared, tmp_path, record_property):
    from transformers import AutoModelForCausalLM

    from skillbook.ml import pruning as pr

    sets = {
        "model": str(family_model(family)),
        "corpus": str(output(prepared, "corpus")),
        "sparsities": [0.5],
        "mlp_sparsities": [0.5],
        "heal_steps": 2,
        "eval_docs": 2,
        "seq_len": 32,
        "decode_tokens": 4,
    }
    try:
        res = run_skill("pruning", tmp_path, sets)
    except ConfigError as err:  # a family whose MLP layout is unknown: refused, unstructured still works
        record_property("support_reason", str(err))
        res = run_skill("pruning", tmp_path, {**sets, "mlp_sparsities": []})
    rows = {r["name"]: r for r in json.loads(output(res, "report").read_text())["rows"]}
    model = AutoModelForCausalLM.from_pretrained(rows["unstructured-0.50"]["path"])
    n = sum(w.numel() for w in matrices(model))
    assert zero_share(model) == pytest.approx(round(0.5 * n) / n, abs=2 / n)
    if "mlp-0.50" in rows:
        small = AutoModelForCausalLM.from_pretrained(rows["mlp-0.50"]["path"])
        width = pr.intermediate_size(model.config)
        assert pr.intermediate_size(small.config) == width // 2
        assert {d for shape in mlp_shapes(small) for d in shape} - {small.config.get_text_config().hidden_size} <= {
            width // 2,
            width,  # phi3's fused gate_up_proj: 2 x the new width
        }
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_bad_input_fails_before_loading(tmp_path):
    from transformers import GPTNeoXConfig

    with pytest.raises(ConfigError, match="model"):
        run_skill("pruning", tmp_path, {"model": str(tmp_path / "no-such-model")})
    with pytest.raises(ConfigError, match=r"sparsities.*\[0, 1\)"):
        run_skill("pruning", tmp_path, {"model": str(tmp_path), "sparsities": [1.5]})
    with pytest.raises(ConfigError, match="both empty"):
        run_skill("pruning", tmp_path, {"model": str(tmp_path), "sparsities": [], "mlp_sparsities": []})
    from transformers import AutoModelForCausalLM

    neox = tmp_path / "neox"  # a tiny real checkpoint of a family whose MLP layout pruning does not know
    neox_cfg = GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    AutoModelForCausalLM.from_config(neox_cfg).save_pretrained(neox)
    with pytest.raises(ConfigError, match="structured: model_type 'gpt_neox' has no known MLP layout"):
        run_skill("pruning", tmp_path / "runs", {"model": str(neox)})
