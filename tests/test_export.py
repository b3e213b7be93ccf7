"""export: the ONNX graph reproduces torch's logits in onnxruntime; the hub folder reloads with its card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import output, run_skill
from skillbook.errors import ConfigError

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]')")


@pytest.fixture(scope="module")
def exported(pretrained_model, tmp_path_factory) -> dict:
    return run_skill("export", tmp_path_factory.mktemp("export"), {"model": str(pretrained_model), "parity_batches": 2})


def test_onnx_logits_match_torch_on_real_text(exported, pretrained_model, prepared):
    """A batch of held-out sentences, right-padded to one length: logits agree at every real token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    onnx_dir = output(exported, "onnx")
    tok = AutoTokenizer.from_pretrained(onnx_dir)  # the tokenizer travels with the graph
    texts = [
        json.loads(line)["text"][:300]
        for line in (output(prepared, "corpus") / "val.jsonl").read_text().splitlines()[:3]
    ]
    tok.padding_side = "right"
    batch = tok(texts, return_tensors="np", padding=True)
    sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(
        ["logits"],
        {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)},
    )[0]
    model = AutoModelForCausalLM.from_pretrained(pretrained_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model(
            input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"])
        ).logits.numpy()
    valid = batch["attention_mask"].astype(bool)
    # fp32 on both sides, different kernels: differences are rounding (~1e-5), far below 1e-3
    assert np.abs(got - ref)[valid].max() < 1e-3
    assert (got.argmax(-1) == ref.argmax(-1))[valid].all()
    assert exported["summary"]["onnx_max_abs_diff"] < 1e-3


def test_hub_folder_reloads_with_model_card(exported, pretrained_model):
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = output(exported, "model")
    assert (hub / "model.safetensors").is_file() and (hub / "tokenizer.json").is_file()
    card = ModelCard.load(hub / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0" and "## How to use" in card.text
    a = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(pretrained_model, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(hub)("Mira lives in", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_export_refuses_a_missing_model(tmp_path):
    with pytest.raises(ConfigError, match="model: .* does not exist"):
        run_skill("export", tmp_path, {"model": str(tmp_path / "missing")})
