"""moe skill: balanced routing with the default aux loss, collapse detected without it, exact upcycling,
a saved model that reloads and generates, and bad input refused before training.

Routing counts are gathered here with our own forward hooks on each layer's router, not taken from the
recipe's logs, so the recipe's statistics are checked against an independent count.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, dtype_tolerance, output, run_skill
from families import FAMILIES
from skillbook.errors import ConfigError, SkillbookError
from skillbook.run import recipe as recipe_mod

# Collapse shows from the first step, so its run can be smaller and shorter than the default one.
TINY = {
    "hidden_size": 64,
    "expert_intermediate_size": 128,
    "num_heads": 4,
    "batch_size": 8,
    "seq_len": 32,
    "steps": 30,
    "eval_interval": 15,
    "eval_windows": 8,
}


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, prepared, tokenizer_dir) -> dict:
    """The default (CPU-tiny) run, and a smaller one with no aux loss and a router biased to expert 0."""
    runs = tmp_path_factory.mktemp("moe_runs")
    data = {"corpus": str(output(prepared, "corpus")), "tokenizer": str(tokenizer_dir)}
    return {
        "balanced": run_skill("moe", runs, data),
        "collapsed": run_skill("moe", runs, {**data, **TINY, "aux_loss_coef": 0.0, "router_init_expert": 0}),
        "corpus": Path(data["corpus"]),
    }


def own_routing_counts(model_dir: Path, corpus: Path):
    """Per layer, how many top-k assignments each expert got on the validation split (our own hooks)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [json.loads(line)["text"] for line in (corpus / "val.jsonl").read_text().splitlines()[:64]]
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
    n_experts = model.config.num_local_experts
    counts = torch.zeros(model.config.num_hidden_layers, n_experts)
    real = batch["attention_mask"].reshape(-1).bool()

    def hook(layer):
        def fn(module, args, out):
            top_k_index = out[2][real]  # padding positions are not tokens
            counts[layer] += torch.bincount(top_k_index.reshape(-1), minlength=n_experts).float()

        return fn

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return counts


def utilization_per_layer(counts) -> list[float]:
    """Share of experts with at least half the uniform share of assignments, per layer."""
    share = counts / counts.sum(dim=1, keepdim=True)
    return ((share >= 0.5 / counts.shape[1]).float().mean(dim=1)).tolist()


def test_default_aux_loss_keeps_every_layer_utilized(moe_runs):
    res = moe_runs["balanced"]
    util = utilization_per_layer(own_routing_counts(output(res, "model"), moe_runs["corpus"]))
    assert min(util) >= 0.8, util
    records = [json.loads(line) for line in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("step")]
    assert len(steps) == 200 and len(steps[-1]["loads"]) == 2 and len(steps[-1]["loads"][0]) == 4
    assert 0.9 < steps[-1]["aux_loss_normalised"] < 1.3  # 1.0 = balanced, after dividing by top_k
    assert steps[-1]["moe_loss"] < steps[0]["moe_loss"] - 1.0 and steps[-1]["dense_loss"] < steps[0]["dense_loss"] - 1.0
    assert (Path(res["run_dir"]) / "expert_load.png").stat().st_size > 5000


def test_collapse_without_aux_loss_is_detected(moe_runs):
    balanced = utilization_per_layer(own_routing_counts(output(moe_runs["balanced"], "model"), moe_runs["corpus"]))
    collapsed = utilization_per_layer(own_routing_counts(output(moe_runs["collapsed"], "model"), moe_runs["corpus"]))
    assert max(collapsed) <= 0.5 < min(balanced), (collapsed, balanced)
    res = moe_runs["collapsed"]
    assert res["summary"]["utilization_min"] <= 0.5 and res["summary"]["max_load_ratio"] > 1.5
    assert "IMBALANCED" in (Path(res["run_dir"]) / "report.md").read_text()


def test_dense_twin_has_the_same_active_parameters(moe_runs):
    summary = moe_runs["balanced"]["summary"]
    report = (Path(moe_runs["balanced"]["run_dir"]) / "report.md").read_text()
    assert summary["total_params"] > 1.3 * summary["active_params"]  # sparse: most expert weights idle per token
    dense_row = next(line for line in report.splitlines() if line.startswith("| dense |"))
    dense_active = int(dense_row.split("|")[3].replace(",", ""))
    # Same attention and embeddings, MLP width top_k x expert width: only the routers differ.
    assert abs(summary["active_params"] - dense_active) <= 2 * 4 * 128  # layers x experts x hidden
    assert "## Validation loss at equal steps" in report and "| 200 |" in report


def test_saved_model_reloads_and_generates(moe_runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = output(moe_runs["balanced"], "model")
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    assert model.config.model_type == "mixtral" and model.config.num_experts_per_tok == 2
    ids = tok("Mira", return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert new.shape[1] == ids["input_ids"].shape[1] + 8 or tok.eos_token_id in new[0].tolist()


@pytest.fixture(scope="module")
def small_dense(tmp_path_factory, prepared, tokenizer_dir) -> Path:
    """A 2 x 64 Llama pretrained for 20 steps: any trained dense model shows upcycling is exact, and this one
    trains in seconds even under bf16 autocast on a CPU without native bf16 (CI's forced-bf16 pass)."""
    res = run_skill(
        "pretraining",
        tmp_path_factory.mktemp("dense"),
        {
            "corpus": str(output(prepared, "corpus")),
            "tokenizer": str(tokenizer_dir),
            "n_layer": 2,
            "d_model": 64,
            "n_head": 2,
            "seq_len": 32,
            "total_batch_tokens": 256,
            "batch_size": 8,
            "max_steps": 20,
            "warmup_steps": 2,
            "eval_interval": 1000,
            "eval_windows": 4,
            "peak_flops": 1e11,
            "sample_prompts": ["Mira"],
            "sample_tokens": 2,
        },
    )
    return output(res, "model")


@pytest.mark.autocast
def test_upcycled_model_starts_at_the_dense_loss(small_dense, prepared, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from skillbook.ml.moe import upcycling

    res = run_skill(
        "moe",
        tmp_path,
        {
            "init": "upcycle",
            "dense_model": str(small_dense),
            "steps": 2,
            "eval_interval": 1,
            "seq_len": 32,
            "batch_size": 2,
            "eval_windows": 4,
            "corpus": str(output(prepared, "corpus")),
        },
    )
    # Same function, so fp32 agrees to rounding; bf16 autocast rounds the experts' sum differently (2.8e-4 on
    # a native-bf16 Xeon), so its bound is bf16's relative precision on a loss near 1.
    assert res["summary"]["upcycle_step0_gap"] < dtype_tolerance(res["summary"], fp32=1e-4, bf16=4e-3)
    # And independently: the library's upcycled model gives the dense model's logits.
    dense = AutoModelForCausalLM.from_pretrained(str(small_dense)).eval()
    sparse = upcycling.upcycle(dense, num_experts=4, top_k=2).eval()
    x = torch.randint(0, dense.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(dense(x).logits, sparse(x).logits, atol=1e-4)


def test_bad_input_fails_before_training(tmp_path):
    rec = recipe_mod.load(ROOT / "skills" / "moe")
    with pytest.raises(ConfigError, match="top_k=5 is larger than num_experts=4"):
        recipe_mod.resolve(rec, overrides={"top_k": 5, "num_experts": 4})
    with pytest.raises(ConfigError, match="init=upcycle needs dense_model"):
        recipe_mod.resolve(rec, overrides={"init": "upcycle"})
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = tmp_path / "gpt2"  # a real (tiny) GPT-2: a config-only dir is refused earlier, as having no weights
    AutoModelForCausalLM.from_config(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    runs = tmp_path / "runs"
    with pytest.raises(SkillbookError, match="upcycling needs a Llama-architecture model .*'gpt2'"):
        run_skill("moe", runs, {"init": "upcycle", "dense_model": str(gpt2)})
    run_dir = next((runs / "moe").iterdir())
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "data").exists()  # nothing trained


def test_per_layer_aux_loss_sees_what_the_pooled_loss_misses():
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from skillbook.ml.moe import routing

    layer0 = torch.tensor([8.0, 0.0, 0.0, 8.0]).repeat(64, 1)  # every token -> experts 0 and 3
    layer1 = torch.tensor([0.0, 8.0, 8.0, 0.0]).repeat(64, 1)  # every token -> experts 1 and 2
    assert float(load_balancing_loss_func((layer0, layer1), 4, 2)) == pytest.approx(2.0, abs=0.01)  # "balanced"
    assert float(routing.per_layer_aux_loss((layer0, layer1), 4, 2)) == pytest.approx(4.0, abs=0.01)  # worst case E
    uniform = torch.zeros(64, 4)
    assert float(routing.per_layer_aux_loss((uniform,), 4, 2)) == pytest.approx(2.0, abs=0.01)  # top_k when balanced
    assert routing.utilization([0.25, 0.25, 0.25, 0.25]) == 1.0 and routing.utilization([0.5, 0.5, 0.0, 0.0]) == 0.5
    assert routing.drop_fraction([64, 64, 0, 0], capacity_factor=1.0, top_k=2) == pytest.approx(0.5)


@pytest.mark.family_matrix("moe (upcycling)")
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_upcycling_on_family(family, family_model, prepared, tmp_path, record_property):
    """A Llama upcycles exactly; every other family is refused, before any data or weights load, by one message
    that says why (only Llama's bias-free SwiGLU MLP maps 1:1 onto Mixtral's experts)."""
    sets = {
        "init": "upcycle",
        "dense_model": str(family_model(family)),
        "steps": 2,
        "eval_interval": 1,
        "seq_len": 32,
        "batch_size": 2,
        "eval_windows": 4,
        "corpus": str(output(prepared, "corpus")),
    }
    if family == "llama":
        res = run_skill("moe", tmp_path, sets)
        assert res["summary"]["upcycle_step0_gap"] < dtype_tolerance(res["summary"], fp32=1e-4, bf16=4e-3)
        return
    with pytest.raises(SkillbookError, match=f"upcycling needs a Llama-architecture model .*'{family}'") as info:
        run_skill("moe", tmp_path, sets)
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("*.safetensors"))
    reason = re.sub(r" from \S+config\.json", "", str(info.value))  # the tmp path differs every run
    record_property("support_reason", reason.split(". Use init=scratch")[0])
