"""merging: two LoRA adapters (facts, arithmetic) on the session's pretrained model, merged with PEFT and as
whole models; the best merge keeps most of each adapter's gain on its own task.

The test reloads every saved artifact with the ecosystem's loaders (PeftModel for the adapters and the PEFT
merges, AutoModelForCausalLM for the whole-model merges and the merged `model` output) and computes each
task's held-out answer loss itself (skillbook.ml.evaluate.completion_logprobs: -log p(right answer | prompt),
mean over the task's rows). "Keeps" is relative to the base: kept = (base - merge) / (base - adapter) on
the adapter's own task, so the answer format, which every adapter teaches, is not counted as the merge's
credit twice over; 1.0 = the merge is as good as the single adapter there. The recipe chooses each merge's
weights on validation rows held out of the adapters' training rows; the held-out rows scored here are a
separate file (questions about facts no training row states), so the choice never saw them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import output, run_skill
from families import FAMILIES
from skillbook.errors import ConfigError

TASKS = ("fact", "arithmetic")


def held_out(prepared, limit: int = 200) -> dict[str, list[dict]]:
    from skillbook.ml.evaluate import read_jsonl
    from skillbook.ml.merging import question_kind

    rows = read_jsonl(output(prepared, "preference_data") / "test.jsonl")
    return {t: [r for r in rows if question_kind(r["prompt"]) == t][:limit] for t in TASKS}


def answer_loss(model, tok, rows: dict[str, list[dict]]) -> dict[str, float]:
    from skillbook.ml.evaluate import completion_logprobs

    model.eval()
    out = {}
    for task, held in rows.items():
        logp = completion_logprobs(model, tok, [r["prompt"] for r in held], [r["chosen"] for r in held])
        out[task] = -sum(logp) / len(logp)
    return out


def kept(merged: float, single: float, base: float) -> float:
    return (base - merged) / (base - single)


@pytest.fixture(scope="module")
def merged_run(pretrained_model, prepared, tmp_path_factory) -> dict:
    sets = {
        "model": str(pretrained_model),
        "data": str(output(prepared, "sft_data")),
        "eval_data": str(output(prepared, "preference_data")),
    }
    return run_skill("merging", tmp_path_factory.mktemp("merging"), sets)


def test_best_merge_keeps_each_adapters_gain(merged_run, pretrained_model, prepared):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml.evaluate import read_jsonl

    s, rows = merged_run["summary"], held_out(prepared)
    info = json.loads((output(merged_run, "report").parent / "merging.json").read_text())
    tok = AutoTokenizer.from_pretrained(pretrained_model)

    def base():
        return AutoModelForCausalLM.from_pretrained(pretrained_model)

    scores = {"base": answer_loss(base(), tok, rows)}
    for task in TASKS:
        scores[task] = answer_loss(PeftModel.from_pretrained(base(), info["adapters"][task]), tok, rows)
        # each adapter is a clear gain on its own task: more than a nat of answer loss
        assert scores[task][task] < scores["base"][task] - 1.0, scores
    best = s["best"]
    path = Path(info["merges"][best])
    if (path / "adapter_config.json").is_file():
        best_model = PeftModel.from_pretrained(base(), path)
    else:
        best_model = AutoModelForCausalLM.from_pretrained(path)
    scores[best] = answer_loss(best_model, tok, rows)
    # the weights were chosen on validation rows cut from the training rows, none of them a scored question
    train = {r["prompt"] for r in read_jsonl(output(prepared, "sft_data") / "train.jsonl")}
    assert not train & {r["prompt"] for t in TASKS for r in rows[t]}
    assert info["results"][best].get("weights") or info["results"][best].get("t") is not None
    got = {t: kept(scores[best][t], scores[t][t], scores["base"][t]) for t in TASKS}
    assert min(got.values()) >= 0.9, (best, got, scores)
    assert abs(min(got.values()) - s["best_min_kept"]) < 1e-3  # the recipe measured what we measure
    # the merged hf-model output is that merge folded into the weights: same scores without PEFT
    merged = answer_loss(AutoModelForCausalLM.from_pretrained(output(merged_run, "model")), tok, rows)
    assert all(abs(merged[t] - scores[best][t]) < 1e-3 for t in TASKS), (merged, scores[best])
    # and the adapter output (the best PEFT merge) loads as a PEFT adapter on the base
    peft_best = PeftModel.from_pretrained(base(), output(merged_run, "adapter"))
    assert set(peft_best.peft_config) == {"default"} and s["best_adapter_method"] in info["merges"]
    assert f"| {best} (best) |" in output(merged_run, "report").read_text()


def test_refuses_bad_tasks_and_methods(tmp_path):
    with pytest.raises(ConfigError, match=r"tasks: give two different kinds"):
        run_skill("merging", tmp_path, {"tasks": ["fact", "fact"]})
    with pytest.raises(ConfigError, match=r"methods: .*slerp.*model_slerp"):
        run_skill("merging", tmp_path, {"methods": ["slerp"]})
    with pytest.raises(ConfigError, match=r"val_fraction: 0 leaves no rows"):
        run_skill("merging", tmp_path, {"val_fraction": 0})
    assert not list(tmp_path.rglob("*.safetensors"))


def test_refuses_data_without_a_task(prepared, tmp_path):
    from skillbook.ml.evaluate import read_jsonl
    from skillbook.ml.merging import question_kind

    facts = [
        r for r in read_jsonl(output(prepared, "sft_data") / "train.jsonl") if question_kind(r["prompt"]) == "fact"
    ]
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in facts))
    with pytest.raises(ConfigError, match=r"data: too few rows of task kind\(s\) arithmetic: 0"):
        run_skill("merging", tmp_path / "runs", {"data": str(data)})  # no model: the base is not trained yet
    assert not list((tmp_path / "runs").rglob("*.safetensors"))  # refused before anything trained


@pytest.mark.family_matrix("merging")
@pytest.mark.parametrize("family", FAMILIES)
def test_merging_on_family(family, family_model, prepared, tmp_path, record_property):
    """Two 3-step adapters on the family's tiny model, merged with cat at weights (1, 1): the merged hf-model
    reloads as the same family and its weights are exactly base + delta_fact + delta_arithmetic."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = family_model(family)
    sets = {
        "model": str(model_dir),
        "data": str(output(prepared, "sft_data")),
        "eval_data": str(output(prepared, "preference_data")),
        "methods": ["cat"],
        "weights": [1.0, 1.0],
        "steps": 3,
        "batch_size": 4,
        "eval_limit": 8,
        "max_length": 64,
    }
    try:
        res = run_skill("merging", tmp_path, sets)
    except ConfigError as err:  # a family PEFT cannot adapt: refused with its reason
        record_property("support_reason", str(err))
        assert "lora" in str(err) or "model" in str(err)
        return
    info = json.loads((output(res, "report").parent / "merging.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(output(res, "model"))
    assert merged.config.model_type == AutoModelForCausalLM.from_pretrained(model_dir).config.model_type
    deltas = []
    for task in TASKS:
        one = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), info["adapters"][task])
        deltas.append({k: v - base[k] for k, v in one.merge_and_unload().state_dict().items()})
    moved = 0
    for key, value in merged.state_dict().items():
        want = base[key] + deltas[0][key] + deltas[1][key]
        assert torch.allclose(value, want, atol=1e-5), key
        moved += int(not torch.equal(value, base[key]))
    assert moved > 0  # the adapters did change the weights
