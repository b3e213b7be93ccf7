"""The post-training skills and the skills that read a model, on every family of tests/families.py.

Each `test_<skill>_on_family[<family>]` runs the real recipe on a tiny random-init model of that family
(the session's byte-level BPE tokenizer inside) for a few steps on a few rows, and checks what the Llama
tests check where a random init can show it: the training loss falls, the merged model reloads with
AutoModelForCausalLM and gives the adapter model's logits, evaluation measures every number, the ONNX
graph gives torch's logits. The tests carry the `family_matrix` marker; their ids feed the support table.
No LoRA target is set anywhere here: the default (PEFT's all-linear) has to fit every family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import output, run_skill
from families import FAMILIES
from skillbook.errors import ConfigError

torch = pytest.importorskip("torch", reason="the family matrix needs torch, trl and peft (the `train` extra)")

# What PEFT's all-linear adapts on each family (the output head excluded), as lora_targets reports it.
ALL_LINEAR = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
}
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FEW = {"logging": {"every": 1}, "eval_limit": 4}  # a metric every step; a few held-out rows


def _subset(src: Path, dst: Path, sizes: dict[str, int]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        lines = (src / f"{split}.jsonl").read_text().splitlines()[:n]
        (dst / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="module")
def small(prepared, tmp_path_factory) -> dict[str, Path]:
    """A few rows of each prepared data set: the matrix measures that a family runs, not how well it learns."""
    root = tmp_path_factory.mktemp("family-data")
    return {
        "sft": _subset(output(prepared, "sft_data"), root / "sft", {"train": 32, "test": 4}),
        "questions": _subset(output(prepared, "eval_data"), root / "questions", {"test": 4}),
        "prefs": _subset(output(prepared, "preference_data"), root / "prefs", {"train": 32, "test": 4}),
        "corpus": _subset(output(prepared, "corpus"), root / "corpus", {"val": 4}),
    }


def losses(result: dict) -> list[float]:
    """The training loss at every logged step, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def falls(values: list[float]) -> bool:
    """The mean of the last two logged losses is below the mean of the first two (single steps are noisy)."""
    return len(values) >= 4 and sum(values[-2:]) < sum(values[:2])


def assert_merge_is_faithful(result: dict, base: Path) -> None:
    """The merged model reloads with AutoModelForCausalLM and gives the logits of base + saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir, adapter_dir = output(result, "model"), output(result, "adapter")
    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_dir)
    ids = tok(["Question: Where does Mira live?\nAnswer:", "Mira has a red kite."], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = merged(**ids).logits, adapted.eval()(**ids).logits
    mask = ids["attention_mask"].bool()
    assert torch.allclose(a[mask], b[mask], atol=1e-4), (a - b).abs().max()
    assert result["summary"]["merge_max_logit_diff"] <= 1e-4


@pytest.mark.family_matrix("lora (all-linear)")
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_all_linear_covers_the_family(family, family_model):
    from skillbook.ml.hf_models import lora_targets
    from skillbook.run.blocks import LoRA

    expected = ALL_LINEAR.get(family, LLAMA_LIKE)
    assert lora_targets(str(family_model(family)), LoRA()) == expected
    assert lora_targets(str(family_model(family)), LoRA(), "SEQ_CLS") == expected  # the score head trains fully


@pytest.mark.family_matrix
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_on_family(family, family_model, small, tmp_path):
    base = family_model(family)
    sets = {"model": str(base), "data": str(small["sft"]), "eval_data": str(small["sft"])}
    res = run_skill("sft", tmp_path, {**sets, **FEW, "steps": 6, "batch_size": 4, "max_new_tokens": 4})
    assert falls(losses(res)), losses(res)
    assert_merge_is_faithful(res, base)


@pytest.mark.family_matrix
@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_on_family(family, family_model, small, tmp_path):
    base = family_model(family)
    sets = {"model": str(base), "data": str(small["prefs"]), "eval_data": str(small["questions"])}
    # sft_weight 0: the loss is DPO's alone, so its fall is the margin growing; 8 x 8 = two passes over 32 pairs
    few = {"steps": 8, "batch_size": 8, "max_new_tokens": 4, "sft_weight": 0.0}
    res = run_skill("dpo", tmp_path, {**sets, **FEW, **few})
    assert falls(losses(res)), losses(res)
    assert res["summary"]["train_reward_margin_last"] > 0  # the policy moved toward the chosen answers
    assert_merge_is_faithful(res, base)


@pytest.mark.family_matrix
@pytest.mark.parametrize("family", FAMILIES)
def test_reward_modeling_on_family(family, family_model, small, tmp_path):
    from transformers import AutoModelForSequenceClassification

    sets = {"model": str(family_model(family)), "data": str(small["prefs"]), "method": "lora"}
    res = run_skill("reward-modeling", tmp_path, {**sets, **FEW, "steps": 8, "batch_size": 8})
    assert falls(losses(res)), losses(res)
    rm = AutoModelForSequenceClassification.from_pretrained(output(res, "model"))
    family_type = json.loads((family_model(family) / "config.json").read_text())["model_type"]
    assert rm.config.num_labels == 1 and rm.config.model_type == family_type
    assert 0.0 <= res["summary"]["pairwise_accuracy"] <= 1.0


@pytest.mark.family_matrix
@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_on_family(family, family_model, small, tmp_path):
    """A random init never answers right, so its reward (and GRPO's advantage) is 0: the cell shows the
    trainer samples groups, steps and merges on the family; the reward rising is test_grpo's job."""
    base = family_model(family)
    sets = {"model": str(base), "data": str(small["sft"]), "eval_data": str(small["sft"])}
    few = {"steps": 2, "batch_size": 4, "num_generations": 2, "max_completion_length": 4, "eval_samples": 1}
    res = run_skill("grpo", tmp_path, {**sets, **FEW, **few, "train_limit": 8})
    assert len(losses(res)) == 2
    assert_merge_is_faithful(res, base)


@pytest.mark.family_matrix
@pytest.mark.parametrize("family", FAMILIES)
def test_evaluation_on_family(family, family_model, small, tmp_path):
    from transformers import AutoTokenizer

    sets = {
        "model": str(family_model(family)),
        "corpus": str(small["corpus"]),
        "eval_data": str(small["questions"]),
        "preference_data": str(small["prefs"]),
        "num_samples": 1,
        "sample_max_new_tokens": 4,
        "max_new_tokens": 4,
    }
    report = json.loads(output(run_skill("evaluation", tmp_path, sets), "report").read_text())
    vocab = len(AutoTokenizer.from_pretrained(family_model(family)))
    # A random init predicts nearly uniformly: its perplexity sits near the vocabulary size.
    assert math.isfinite(report["perplexity"]) and vocab / 4 < report["perplexity"] < vocab * 4, report["perplexity"]
    assert report["n_perplexity_tokens"] > 0 and report["n_exact_match"] == 4 and report["n_preference"] == 4
    assert 0.0 <= report["exact_match"] <= 1.0 and 0.0 <= report["preference_accuracy"] <= 1.0
    assert report["samples"][0]["generation"] is not None


@pytest.mark.family_matrix
@pytest.mark.parametrize("family", FAMILIES)
def test_export_on_family(family, family_model, small, tmp_path):
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = family_model(family)
    res = run_skill("export", tmp_path, {"model": str(base), "exporter": "torchscript", "parity_batches": 1})
    onnx_dir = output(res, "onnx")
    tok = AutoTokenizer.from_pretrained(onnx_dir)
    tok.padding_side = "right"
    texts = [json.loads(line)["text"][:200] for line in (small["corpus"] / "val.jsonl").read_text().splitlines()]
    batch = tok(texts[:3], return_tensors="np", padding=True)
    feed = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    got = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model(**{k: torch.tensor(v) for k, v in feed.items()}).logits.numpy()
    valid = feed["attention_mask"].astype(bool)
    assert np.abs(got[0] - ref)[valid].max() < 1e-3
    assert res["summary"]["onnx_max_abs_diff"] < 1e-3


# ---------------------------------------------------------------------------------------------
# LoRA targets: the default fits GPT-2 from the command line; a target that fits nothing is refused
# ---------------------------------------------------------------------------------------------


def test_sft_cli_on_gpt2_needs_no_lora_setting(family_model, small, tmp_path):
    from click.testing import CliRunner

    from skillbook.cli import main

    args = ["run", "sft", "--runs-dir", str(tmp_path), "--json", "--set", f"model={family_model('gpt2')}"]
    data_file = small["sft"] / "train.jsonl"  # one file, as users have it: the recipe splits off the held-out rows
    args += ["--set", f"data={data_file}", "--set", "steps=2", "--set", "batch_size=4", "--set", "eval_limit=2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    run_dir = Path(json.loads(res.output[res.output.index("{") :])["run_dir"])
    log = (run_dir / "log.txt").read_text()
    assert "LoRA targets: c_attn, c_proj, c_fc" in log
    assert f"data: {data_file} (32 rows) -> " in log, log


def test_lora_targets_that_match_nothing_fail_before_any_model_loads(family_model, small, tmp_path, monkeypatch):
    import transformers

    def no_loading(*_, **__):
        raise AssertionError("a model was loaded before the LoRA targets were checked")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", no_loading)
    sets = {"model": str(family_model("gpt2")), "data": str(small["sft"]), "lora": {"targets": "q_proj,c_fc,v_prj"}}
    with pytest.raises(ConfigError) as info:
        run_skill("sft", tmp_path, sets)
    msg = str(info.value)
    assert msg.startswith("lora.targets: 'q_proj', 'v_prj' match no layer") and "(gpt2)" in msg
    assert "its linear layers are c_attn, c_proj, c_fc, lm_head" in msg
    (run_dir,) = (tmp_path / "sft").iterdir()
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == ["config.yaml", "error.txt", "log.txt"]


def test_lora_targets_field_reads_the_forms_users_write():
    from pydantic import ValidationError

    from skillbook.run.blocks import LoRA

    assert LoRA().targets == "all-linear" and LoRA(targets="ALL-LINEAR").targets == "all-linear"
    assert LoRA(targets="c_attn, c_proj").targets == ["c_attn", "c_proj"]  # --set lora.targets=c_attn,c_proj
    assert LoRA(targets=["q_proj", "v_proj"]).targets == ["q_proj", "v_proj"]
    with pytest.raises(ValidationError):
        LoRA(targets=[])


def test_a_family_transformers_cannot_build_is_refused_before_any_model_loads(family_model, small, tmp_path):
    import shutil

    model_dir = tmp_path / "foo"
    shutil.copytree(family_model("llama"), model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(cfg | {"model_type": "foo", "architectures": ["FooForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"model: .*model_type 'foo', which transformers .* cannot build"):
        run_skill("sft", tmp_path / "runs", {"model": str(model_dir), "data": str(small["sft"])})
    assert not list((tmp_path / "runs").rglob("*.safetensors"))
