"""GGUF for every family: llama.cpp's own converter, run by the quantization skill on each tiny random-init model.

One `skills run quantization` per family (F32 + Q8_0, one converter run) writes the files every check here
reads, so each family costs one conversion:
- F32: llama.cpp's logits equal transformers' within 1 % of the largest |logit| on real text (the recipe
  itself also checks this; measured on the 2-core EPYC, fp32, f32 KV cache: 2.6e-7 to 4.7e-7 for
  llama/mistral/qwen2/qwen3/phi3; 1.3e-4 for gpt2 and 3.5e-4 for gemma2, whose tanh-GELU llama.cpp
  evaluates through an f16 table).
- Q8_0: teacher-forced next-token argmax equals transformers' on >= 90 % of positions. Random-init logits
  are nearly flat, so Q8_0's weight rounding flips near-ties a trained model would not have; measured over
  5 corpus documents (183-208 positions): 0.973 (gemma2), 0.978 (phi3), 0.989 (llama, mistral), 1.0
  (qwen2, qwen3, gpt2).
- llama.cpp's token ids equal the HF tokenizer's on corpus text and a stress string.
Gemma 2: llama.cpp always scales queries by 1/sqrt(head_dim), as every hub Gemma 2 has
(query_pre_attn_scalar = head_dim, which tests/families.py sets too); a mismatched config is refused, tested below.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import output, run_skill
from families import FAMILIES

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[serve]')")

from skillbook.errors import ConfigError  # noqa: E402
from skillbook.ml import gguf_convert as gc  # noqa: E402
from skillbook.ml import gguf_export as gx  # noqa: E402

STRESS = (
    "Numbers 3 33 333 3333 12345678 and 3.14, -42; café naïve Ünïcödé 日本語 🦙✅  \t\n\n   runs   of   spaces\n"
    "I've they're 'RE we'Ve it's DON'T  trailing  "
)
PARITY = 0.01
AGREEMENT_FLOOR = 0.9


@pytest.fixture(scope="module")
def texts(prepared) -> list[str]:
    val = output(prepared, "corpus") / "val.jsonl"
    return [json.loads(line)["text"] for line in val.read_text().splitlines()[:5]]


def gguf_path(res: dict, qtype: str) -> Path:
    return next((Path(res["run_dir"]) / "gguf").glob(f"*-{qtype}.gguf"))


def hf(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def ids_of(tok, text: str) -> list[int]:
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return (bos + tok(text, add_special_tokens=False)["input_ids"])[:200]


@pytest.mark.family_matrix("quantization")
@pytest.mark.parametrize("family", FAMILIES)
def test_quantization_on_family(family_quantized, family, record_property):
    """The skill's own run: converted, checked (token ids, F32 parity) and measured; the values go to the
    support table's record, which renders quantization's SKILL.md family table."""
    _, res = family_quantized(family)
    s = res["summary"]
    values = {
        "converter class": s["architecture"],
        "pre-tokenizer": f"`{s['pre_tokenizer']}`",
        "F32 max abs logit diff / max abs logit": s["f32_logit_rel_diff"],
        "token ids equal (docs)": f"{s['tokenization_equal_docs']} of 4",
        "Q8_0 bits per weight": s["bits_per_weight"],
    }
    record_property("support_values", values)
    assert s["f32_logit_rel_diff"] < PARITY and s["tokenization_equal_docs"] == 4
    assert s["pre_tokenizer"] == ("qwen2" if family == "qwen2" else "gpt-2")  # transformers 5's Qwen2Tokenizer
    assert output(res, "gguf").name.endswith("-Q8_0.gguf") and 8.0 < s["bits_per_weight"] < 12.0  # biases, norms: F32


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_and_token_ids_match_transformers(family_quantized, texts, family):
    model_dir, res = family_quantized(family)
    tok, model = hf(model_dir)
    llm = gx.load_gguf(gguf_path(res, "F32"), n_ctx=256, logits_all=True, kv_f32=True)
    assert gx.token_mismatches(llm, tok, [*texts, STRESS]) == []
    assert gx.logit_parity(llm, model, [ids_of(tok, t) for t in texts[:3]]) < PARITY
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_next_token_agrees_with_transformers(family_quantized, texts, family):
    import torch

    model_dir, res = family_quantized(family)
    tok, model = hf(model_dir)
    llm = gx.load_gguf(gguf_path(res, "Q8_0"), n_ctx=256, logits_all=True)
    same = total = 0
    for t in texts:
        ids = ids_of(tok, t)
        with torch.inference_mode():
            ref = model(torch.tensor([ids])).logits[0].numpy().argmax(-1)
        got = gx.gguf_logits(llm, ids).argmax(-1)
        same, total = same + int((ref == got).sum()), total + len(ids)
    assert same / total >= AGREEMENT_FLOOR, f"{same}/{total}"


def test_llama3_tokenizer_gets_llama_bpe(texts, prepared, tmp_path):
    """A Llama-3-style tokenizer (its split regex), unknown to llama.cpp's hash table: tokenizer.json says llama-bpe."""
    import gguf

    from families import build_family_model, train_llama3_tokenizer

    corpus = [json.loads(line)["text"] for line in (output(prepared, "corpus") / "train.jsonl").open()][:400]
    model_dir = build_family_model("llama", train_llama3_tokenizer(corpus, tmp_path / "tok"), tmp_path / "m")
    info = gc.convert(model_dir, tmp_path / "m.gguf", "Q8_0")
    assert info["pre_tokenizer"] == "llama-bpe" and info["pre_tokenizer_source"] == "tokenizer.json pre_tokenizer"
    field = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.pre"]
    assert field.contents() == "llama-bpe"
    tok, _ = hf(model_dir)
    assert gx.token_mismatches(gx.load_gguf(tmp_path / "m.gguf", n_ctx=256), tok, [*texts, STRESS]) == []


def _copy(src: Path, dst: Path, edit: str, change) -> Path:
    shutil.copytree(src, dst)
    (dst / edit).write_text(json.dumps(change(json.loads((dst / edit).read_text()))))
    return dst


def test_unidentifiable_pre_tokenizer_is_refused_before_writing(family_model, tmp_path):
    """Digits + ByteLevel (the tokenization skill's split_digits): llama.cpp has no such pre-tokenizer."""
    digits = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    model_dir = _copy(family_model("llama"), tmp_path / "m", "tokenizer.json", lambda t: t | {"pre_tokenizer": digits})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match=r"pre-tokenizer \(Sequence\[Digits.*ByteLevel"):
        gc.convert_many(model_dir, {"F32": out / "m-F32.gguf", "Q4_K_M": out / "m-Q4_K_M.gguf"})
    assert list(out.iterdir()) == []


def test_unsupported_architecture_is_refused_before_writing(family_model, tmp_path):
    model_dir = _copy(
        family_model("llama"), tmp_path / "m", "config.json", lambda c: c | {"architectures": ["OPTForCausalLM"]}
    )
    with pytest.raises(ConfigError, match=r"architecture 'OPTForCausalLM' is not supported .* knows \d+ archit"):
        run_skill("quantization", tmp_path / "runs", {"model": str(model_dir), "types": ["F32", "Q4_K_M"]})
    assert [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and ".gguf" in p.name] == []


def test_gemma2_query_scale_mismatch_is_refused_and_would_be_wrong(family_model, tmp_path, monkeypatch, texts):
    """llama.cpp has no key for query_pre_attn_scalar: a Gemma 2 whose value is not head_dim is refused; the
    negative control converts it anyway and the parity check sees the difference (3.4 % measured)."""
    model_dir = _copy(
        family_model("gemma2"), tmp_path / "m", "config.json", lambda c: c | {"query_pre_attn_scalar": 256}
    )
    with pytest.raises(ConfigError, match="query_pre_attn_scalar=256 .* 1/sqrt\\(16\\)"):
        gc.convert(model_dir, tmp_path / "m.gguf", "F32")
    assert not (tmp_path / "m.gguf").exists()
    monkeypatch.setattr(gc, "_faithful", lambda d, tj, name: (name or d.name, None))
    gc.convert(model_dir, tmp_path / "m.gguf", "F32")
    tok, model = hf(model_dir)
    llm = gx.load_gguf(tmp_path / "m.gguf", n_ctx=256, logits_all=True, kv_f32=True)
    assert gx.logit_parity(llm, model, [ids_of(tok, t) for t in texts[:3]]) > PARITY


def test_pre_tokenizer_rules():
    """The tokenizer.json shapes recognised without llama.cpp's hash table, and a refusal naming what was found."""
    bl = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    split = {"type": "Split", "pattern": {"Regex": gc.LLAMA3_REGEX}, "behavior": "Isolated", "invert": False}
    no_regex = bl | {"use_regex": False}
    assert gc.pre_tokenizer_from_json({"pre_tokenizer": bl}) == "gpt-2"
    assert gc.pre_tokenizer_from_json({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [bl]}}) == "gpt-2"
    seq = {"type": "Sequence", "pretokenizers": [split, no_regex]}
    assert gc.pre_tokenizer_from_json({"pre_tokenizer": seq}) == "llama-bpe"
    qwen = {"type": "Sequence", "pretokenizers": [split | {"pattern": {"Regex": gc.QWEN2_REGEX}}, no_regex]}
    assert gc.pre_tokenizer_from_json({"pre_tokenizer": qwen, "normalizer": {"type": "NFC"}}) == "qwen2"
    with pytest.raises(ConfigError, match="Metaspace"):
        gc.pre_tokenizer_from_json({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})
    with pytest.raises(ConfigError, match="NFKC normalizer"):
        gc.pre_tokenizer_from_json({"pre_tokenizer": bl, "normalizer": {"type": "NFKC"}})
