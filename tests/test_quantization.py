"""quantization: GGUF files written by llama.cpp's converter (skillbook.ml.gguf_convert) load in llama.cpp and
match transformers on the project's pretrained Llama. tests/test_gguf_families.py does the same for every family.

Parity runs on the pretrained tiny model with its q/k projections scaled up 3x: attention then
depends sharply on the rotary layout, so a wrong q/k permutation would move the logits by whole
units (0.49 to 0.91 relative, measured with the former hand-written writer) instead of hiding under a
near-uniform softmax.

Tolerances (max |logit difference| / max |logit| over every position of 4 held-out documents),
with llama.cpp's KV cache in f32 (its default f16 cache alone adds 2e-4 to 1e-3 relative error):
- F32: same weights in the same precision; only summation order and kernel fusion differ, so the
  error is fp32 rounding (eps 1.2e-7) grown over a few layers. Observed on a 2x64 and the 4x256
  default model: 5.7e-7 to 6.5e-7 (plain), 1.6e-6 to 2.2e-6 (q/k x3). We allow 5e-5.
- F16: every weight rounded to 11 significant bits (relative error <= 2^-11 = 4.9e-4 each), and
  llama.cpp also rounds activations to f16 for the matmuls. Observed 3.0e-4 to 1.2e-3 on the
  same models. We allow 1e-2.
- A missing q/k permutation gave 0.49 to 0.91 on the same models: both tolerances sit far below it
  (the negative control for the parity check itself is in test_gguf_families: Gemma 2's query scale).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import output, run_skill

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[serve]')")

from skillbook.ml import gguf_convert as gc  # noqa: E402
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


@pytest.fixture(scope="module")
def sharp_ggufs(sharp_model, tmp_path_factory) -> dict[str, dict]:
    """F32, F16 and Q8_0 of the sharp model from one converter run."""
    out = tmp_path_factory.mktemp("sharp-gguf")
    return gc.convert_many(sharp_model, {t: out / f"m-{t}.gguf" for t in ("F32", "F16", "Q8_0")})


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
def test_gguf_logits_match_transformers(sharp_ggufs, docs, reference, ftype, tol):
    info = sharp_ggufs[ftype]
    assert info["tensor_types"].get(ftype, 0) > 0 and info["architecture"] == "LlamaForCausalLM"
    assert max_rel_diff(Path(info["path"]), docs, reference) < tol


def test_write_gguf_keeps_its_name(sharp_model, tmp_path):
    """The former writer's entry point (serving and evaluation tests call it) now runs the converter."""
    info = gx.write_gguf(sharp_model, tmp_path / "m.gguf", "Q8_0")
    assert info["pre_tokenizer"] == "gpt-2" and info["tensor_types"].get("Q8_0", 0) > 0


def test_llama_cpp_tokenizer_matches_hf(sharp_model, sharp_ggufs, prepared):
    """The converter's vocab + merges + the pre-tokenizer read from tokenizer.json reproduce the HF ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sharp_model)
    llm = gx.load_gguf(Path(sharp_ggufs["Q8_0"]["path"]), n_ctx=128)
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
    gc.convert_many(pretrained_model, {t: tmp_path / f"{t}.gguf" for t in ("F32", "Q8_0")})
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
    assert s["architecture"] == "LlamaForCausalLM" and s["pre_tokenizer"] == "gpt-2"
    assert s["f32_logit_rel_diff"] < 1e-4 and s["tokenization_equal_docs"] == 8


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
