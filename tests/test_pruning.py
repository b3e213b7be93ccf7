"""The pruning skill and skillbook.ml.pruning, on the session's pretrained model and on every family.

- unstructured: the saved model has exactly the stated share of zeros in its blocks' weight matrices
  (counted here) and reloads with AutoModelForCausalLM;
- structured MLP pruning: the saved config has the smaller intermediate_size, the real tensors have the
  smaller shapes, the parameter count and file shrink, and it reloads;
- structured head pruning (skillbook.ml.head_pruning): whole KV groups go, the config states the new head
  counts with an unchanged head_dim, q/k/v/o have the smaller shapes, the model reloads with the same logits,
  pruning zero groups is the identity and pruning some equals the dense model with those heads' o_proj
  columns zeroed; gpt2 is refused by name;
- healing lowers held-out perplexity, recomputed here with skillbook.ml.evaluate.perplexity on the
  reloaded models (the recipe's numbers must match it);
- a family whose MLP or head layout is unknown, or a head share that is not whole KV groups, is refused
  with one ConfigError before any weights load.
"""

from __future__ import annotations

import json

import pytest

from conftest import output, run_skill, tiny_model_dir
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


def attn_shapes(model) -> dict[str, tuple[int, ...]]:
    """Attention projection (q_proj, o_proj, phi3's qkv_proj, ...) -> its weight's shape in every layer."""
    shapes: dict[str, set] = {}
    for name, p in model.named_parameters():
        if ".self_attn." in name and name.endswith("proj.weight"):
            shapes.setdefault(name.split(".")[-2], set()).add(tuple(p.shape))
    assert all(len(v) == 1 for v in shapes.values()), shapes  # every layer keeps the same heads
    return {k: v.pop() for k, v in shapes.items()}


def test_recipe_prunes_shrinks_and_heals(pretrained_model, prepared, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    corpus = output(prepared, "corpus")
    sets = {
        "model": str(pretrained_model),
        "corpus": str(corpus),
        "sparsities": [0.5],
        "mlp_sparsities": [0.5],
        "head_sparsities": [0.5],
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

    # Heads: the default model has 2 heads = 2 KV groups; half of them go, head_dim stays, q/k/v/o shrink.
    heads = rows["heads-0.50"]
    dense_cfg = AutoConfig.from_pretrained(pretrained_model)
    kv = dense_cfg.num_key_value_heads
    head_dim = dense_cfg.hidden_size // dense_cfg.num_attention_heads
    small = AutoModelForCausalLM.from_pretrained(heads["path"]).eval()
    cfg = small.config
    assert (cfg.num_key_value_heads, cfg.head_dim) == (kv // 2, head_dim) == (heads["num_key_value_heads"], head_dim)
    assert cfg.num_attention_heads == dense_cfg.num_attention_heads // 2 == heads["num_attention_heads"]
    q, k = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    assert attn_shapes(small) == {
        "q_proj": (q, hidden),
        "k_proj": (k, hidden),
        "v_proj": (k, hidden),
        "o_proj": (hidden, q),
    }
    n_small = sum(p.numel() for p in small.parameters())
    removed = dense_cfg.num_hidden_layers * 2 * hidden * head_dim * (dense_cfg.num_attention_heads // 2 + kv // 2)
    assert n_small == heads["params"] == s["dense_params"] - removed
    assert heads["file_bytes"] < s["dense_file_bytes"]
    assert heads["tokens_per_s"] > 0
    healed = perplexity(small, tok, texts, max_length=128, batch_size=8)
    assert healed == pytest.approx(heads["perplexity_healed"], rel=1e-5)
    assert heads["perplexity_pruned"] > dense_ppl  # losing half the heads costs perplexity ...
    assert healed < heads["perplexity_pruned"]  # ... and healing wins some back


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])  # GQA; q/k/v biases; fused qkv_proj (MHA)
def test_head_pruning_is_exact(family, family_model, tmp_path):
    """Pruning 0 groups is the identity; pruning some equals the dense model with the dropped groups' o_proj
    columns zeroed (the only path from a head to the residual stream); the saved model reloads identically."""
    from transformers import AutoModelForCausalLM

    from skillbook.ml import head_pruning as hp

    dense = AutoModelForCausalLM.from_pretrained(family_model(family)).eval()
    heads, kv, head_dim = hp.attention_shape(dense.config)
    x = torch.randint(0, dense.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=x).logits

    assert torch.equal(logits(hp.prune_heads(dense, 0.0).eval()), logits(dense))
    small = hp.prune_heads(dense, 0.5).eval()
    assert hp.attention_shape(small.config) == (heads // 2, kv // 2, head_dim)
    hidden = dense.config.hidden_size
    q, k = heads // 2 * head_dim, kv // 2 * head_dim
    want = {"o_proj": (hidden, q)} | (
        {"qkv_proj": (q + 2 * k, hidden)}
        if family == "phi3"
        else {"q_proj": (q, hidden), "k_proj": (k, hidden), "v_proj": (k, hidden)}
    )
    assert attn_shapes(small) == want

    masked = AutoModelForCausalLM.from_pretrained(family_model(family)).eval()
    score = hp.group_importance(dense)
    per_group = heads // kv * head_dim  # o_proj columns of one KV group
    for layer, scores in zip(masked.model.layers, score, strict=True):
        for g in torch.topk(scores, kv // 2, largest=False).indices.tolist():
            layer.self_attn.o_proj.weight.data[:, g * per_group : (g + 1) * per_group] = 0
    torch.testing.assert_close(logits(small), logits(masked), rtol=1e-5, atol=1e-5)

    small.save_pretrained(tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert reloaded.config.head_dim == head_dim
    assert torch.equal(logits(reloaded), logits(small))


@pytest.mark.family_matrix("pruning")
@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_on_family(family, family_model, prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    from skillbook.ml import pruning as pr

    sets = {
        "model": str(family_model(family)),
        "corpus": str(output(prepared, "corpus")),
        "sparsities": [0.5],
        "mlp_sparsities": [0.5],
        "head_sparsities": [0.5],
        "heal_steps": 2,
        "eval_docs": 2,
        "seq_len": 32,
        "decode_tokens": 4,
    }
    if family == "gpt2":  # head pruning asked for by name: refused with the reason; the default skips it
        with pytest.raises(ConfigError, match="head_sparsities: gpt2 cannot be head-pruned.*prune_heads"):
            run_skill("pruning", tmp_path / "refused", sets)
        sets.pop("head_sparsities")
    res = run_skill("pruning", tmp_path, sets)
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
    if family != "gpt2":
        from skillbook.ml import head_pruning as hp

        small = AutoModelForCausalLM.from_pretrained(rows["heads-0.50"]["path"])
        heads, kv, head_dim = hp.attention_shape(model.config)
        assert hp.attention_shape(small.config) == (heads // 2, kv // 2, head_dim)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
        assert rows["heads-0.50"]["perplexity_healed"] > 0


def test_bad_input_fails_before_loading(tmp_path):
    from transformers import GPTNeoXConfig

    with pytest.raises(ConfigError, match="model"):
        run_skill("pruning", tmp_path, {"model": str(tmp_path / "no-such-model")})
    with pytest.raises(ConfigError, match=r"sparsities.*\[0, 1\)"):
        run_skill("pruning", tmp_path, {"model": str(tmp_path), "sparsities": [1.5]})
    with pytest.raises(ConfigError, match="all empty"):
        empty = {"sparsities": [], "mlp_sparsities": [], "head_sparsities": []}
        run_skill("pruning", tmp_path, {"model": str(tmp_path), **empty})
    from transformers import AutoModelForCausalLM

    neox = tmp_path / "neox"  # a tiny real checkpoint of a family whose MLP layout pruning does not know
    neox_cfg = GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    AutoModelForCausalLM.from_config(neox_cfg).save_pretrained(neox)
    with pytest.raises(ConfigError, match="structured: model_type 'gpt_neox' has no known MLP layout"):
        run_skill("pruning", tmp_path / "runs", {"model": str(neox)})
    with pytest.raises(ConfigError, match="head_sparsities: model_type 'gpt_neox' has no known attention-head layout"):
        run_skill("pruning", tmp_path / "runs", {"model": str(neox), "mlp_sparsities": [], "head_sparsities": [0.5]})
    llama = tiny_model_dir(tmp_path / "llama")  # 2 heads = 2 KV groups: only 0 or 1 group can go
    with pytest.raises(ConfigError, match=r"head_sparsities: 0.25 x 2 KV groups is not a whole number.*\[0.0, 0.5\]"):
        run_skill("pruning", tmp_path / "runs", {"model": str(llama), "head_sparsities": [0.25]})
