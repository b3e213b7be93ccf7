"""quantization: GGUF files written by skillbook.ml.gguf_export load in llama.cpp and match transformers.

Parity runs on the pretrained tiny model with its q/k projections scaled up 3x: attention then
depends sharply on the rotary layout, so a missing q/k permutation moves the logits by whole
units (checked below as a negative control) instead of hiding under a near-uniform softmax.

Tolerances (max |logit difference| / max |logit| over every position of 4 held-out documents),
with llama.cpp's KV cache in f32 (its default f16 cache alone adds 2e-4 to 1e-3 relative error):
- F32: same weights in the same precision; only summation order and kernel fusion differ, so the
  error is fp32 rounding (eps 1.2e-7) grown over a few layers. Observed on a 2x64 and the 4x256
  default model: 5.7e-7 to 6.5e-7 (plain), 1.6e-6 to 2.2e-6 (q/k x3). We allow 5e-5.
- F16: every weight rounded to 11 significant bits (relative error <= 2^-11 = 4.9e-4 each), and
  llama.cpp also rounds activations to f16 for the matmuls. Observed 3.0e-4 to 1.2e-3 on the
  same models. We allow 1e-2.
- A missing q/k permutation gives 0.49 to 0.91 on the same models: both tolerances sit far below
  it, and the negative-control test asserts > 0.05.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import output, run_skill

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[serve]')")

from skillbook.ml import gguf_export as gx  # noqa: E402


@pytest.fixture(scope="module")
def sharp_model(pretrained_model, tmp_path_factory) -> Path:
    """The pretrained tiny model with q and k scaled by 3 (sharper attention, same architecture)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharp") / "model"
    model = AutoModelForCausalLM.from_pretrained(pretrained_model, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(pretrained_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def docs(sharp_model, prepared) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sharp_model)
    val = output(prepared, "corpus") / "val.jsonl"
    texts = [json.loads(line)["text"] for line in val.read_text().splitlines()[:4]]
    return [([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"])[:128] for t in texts]


def hf_logits(model_dir: Path, docs: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(torch.tensor([ids])).logits[0].numpy() for ids in docs]


def max_rel_diff(path: Path, docs: list[list[int]], ref: list[np.ndarray]) -> float:
    llm = gx.load_gguf(path, n_ctx=128, logits_all=True, kv_f32=True)
    worst = 0.0
    for ids, r in zip(docs, ref):
        worst = max(worst, float(np.abs(gx.gguf_logits(llm, ids) - r).max() / np.abs(r).max()))
    return worst


@pytest.fixture(scope="module")
def reference(sharp_model, docs) -> list[np.ndarray]:
    return hf_logits(sharp_model, docs)


@pytest.mark.parametrize("ftype,tol", [("F32", 5e-5), ("F16", 1e-2)])
def test_gguf_logits_match_transformers(sharp_model, docs, reference, tmp_path, ftype, tol):
    info = gx.write_gguf(sharp_model, tmp_path / f"m-{ftype}.gguf", ftype)
    assert info["tensor_types"].get(ftype, 0) > 0
    assert max_rel_diff(tmp_path / f"m-{ftype}.gguf", docs, reference) < tol


def test_missing_rotary_permutation_is_caught(sharp_model, docs, reference, tmp_path, monkeypatch):
    """Negative control: skip the q/k permutation and the same check fails by a wide margin."""
    monkeypatch.setattr(gx, "permute_rotary", lambda w, n_head: w)
    gx.write_gguf(sharp_model, tmp_path / "bad.gguf", "F32")
    assert max_rel_diff(tmp_path / "bad.gguf", docs, reference) > 0.05


def test_llama_cpp_tokenizer_matches_hf(sharp_model, prepared, tmp_path):
    """The GPT-2 style vocab + merges + pre type reproduce the HF tokenizer's ids on held-out text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sharp_model)
    gx.write_gguf(sharp_model, tmp_path / "m.gguf", "Q8_0")
    llm = gx.load_gguf(tmp_path / "m.gguf", n_ctx=128)
    val = output(prepared, "corpus") / "val.jsonl"
    texts = [json.loads(line)["text"] for line in val.read_text().splitlines()[:20]]
    for text in texts:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=False)
            == tok(text, add_special_tokens=False)["input_ids"]
        )
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id


def test_q8_0_greedy_decoding_agrees_with_f32(pretrained_model, tmp_path):
    """Q8_0 picks F32's greedy token on >= 95 % of positions, teacher-forced on F32's own continuations.

    Comparing two free-running generations position by position would count every token after the
    first near-tie as a disagreement; feeding both models the same prefix measures each step alone.
    """
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pretrained_model)
    prompts = [
        "Question: What colour is Mira's kite?\nAnswer:",
        "Mira lives in",
        "The baker of Ashby",
        "3 + 4 =",
        "Tobin has a pet",
        "Question: What is Lena's job?\nAnswer:",
        "In Calder,",
        "Ada likes",
    ]
    for ftype in ("F32", "Q8_0"):
        gx.write_gguf(pretrained_model, tmp_path / f"{ftype}.gguf", ftype)
    f32 = gx.load_gguf(tmp_path / "F32.gguf", n_ctx=128)
    q8 = gx.load_gguf(tmp_path / "Q8_0.gguf", n_ctx=128, logits_all=True)
    same = total = 0
    for p in prompts:
        ids = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        gen = []
        for t in f32.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            gen.append(t)
            if len(gen) == 24:
                break
        picks = np.argmax(gx.gguf_logits(q8, ids + gen), axis=-1)[len(ids) - 1 : len(ids) + len(gen) - 1]
        same += int(sum(int(a) == b for a, b in zip(picks, gen)))
        total += len(gen)
    assert total == 24 * len(prompts) and same / total >= 0.95, f"{same}/{total}"


def test_quantization_recipe_reports_every_type(pretrained_model, prepared, tmp_path):
    res = run_skill(
        "quantization",
        tmp_path,
        {
            "model": str(pretrained_model),
            "corpus": str(output(prepared, "corpus")),
            "types": ["F32", "Q8_0", "Q4_K_M"],
            "eval_docs": 8,
            "decode_tokens": 24,
            "torch_int8": True,
        },
    )
    s = res["summary"]
    gguf_path = output(res, "gguf")
    assert gguf_path.suffix == ".gguf" and "Q8_0" in gguf_path.name
    llm = gx.load_gguf(gguf_path, n_ctx=64)  # the output loads with the ecosystem's loader
    assert llm.n_vocab() > 0
    rows = {r["name"]: r for r in json.loads((Path(res["run_dir"]) / "quantization.json").read_text())}
    base = rows["transformers fp32"]["perplexity"]
    assert abs(rows["GGUF F32"]["perplexity"] - base) / base < 1e-3  # same weights, same numbers
    assert abs(s["ppl_delta"]) / base < 0.02  # Q8_0 is near-lossless
    assert 8.0 < s["bits_per_weight"] < 9.0  # 34 bytes per 32 weights + F32 norms
    assert rows["GGUF F32"]["size_bytes"] > rows["GGUF Q8_0"]["size_bytes"] > rows["GGUF Q4_K_M"]["size_bytes"]
    assert rows["torch dynamic int8"]["perplexity"] < base * 1.1
    assert all(r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert "| GGUF Q8_0 |" in (Path(res["run_dir"]) / "report.md").read_text()


def test_refuses_bad_inputs(tmp_path, pretrained_model):
    import torch

    from skillbook.errors import ConfigError

    with pytest.raises(ConfigError, match="model: .* does not exist"):
        run_skill("quantization", tmp_path, {"model": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="types"):
        run_skill("quantization", tmp_path, {"model": str(pretrained_model), "types": ["Q3_XYZ"]})
    if not torch.cuda.is_available():  # on a GPU machine bnb_4bit is allowed, so only CPU checks the refusal
        with pytest.raises(ConfigError, match="bnb_4bit: .*CUDA"):
            run_skill("quantization", tmp_path, {"model": str(pretrained_model), "bnb_4bit": True})
