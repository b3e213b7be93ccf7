"""GGUF files in and out of llama.cpp: write one (by llama.cpp's own converter), quantize, inspect, measure.

Writing is skillbook.ml.gguf_convert: llama.cpp's `convert_hf_to_gguf.py` classes, run in a subprocess, for
every architecture llama.cpp supports. K-quants (Q4_K_M …) and Q4_0 come from an F16/F32 file through
llama.cpp's own quantizer (`quantize_gguf`, via llama-cpp-python). Reading (`gguf_tensor_types`,
`gguf_bits_per_weight`) uses the pip `gguf` package; measuring goes through llama-cpp-python.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skillbook.ml.gguf_convert import ALL_TYPES, convert, gguf_bits_per_weight, gguf_tensor_types, quantize_gguf
from skillbook.ml.gguf_convert import CONVERTER_TYPES as DIRECT_TYPES
from skillbook.ml.gguf_convert import QUANTIZER_TYPES as LLAMA_CPP_TYPES

# re-exported: the names callers of this module already use
__all__ = [
    "ALL_TYPES",
    "DIRECT_TYPES",
    "LLAMA_CPP_TYPES",
    "gguf_bits_per_weight",
    "gguf_logits",
    "gguf_perplexity",
    "gguf_decode_speed",
    "gguf_tensor_types",
    "load_gguf",
    "logit_parity",
    "quantize_gguf",
    "token_mismatches",
    "torch_decode_speed",
    "torch_perplexity",
    "write_gguf",
]


def write_gguf(model_dir: Path, out_path: Path, ftype: str = "F16", name: str | None = None) -> dict:
    """One GGUF of `ftype` from an HF model dir (any architecture llama.cpp supports); returns its summary.

    Kept under this name for callers of the former Llama-only writer; see gguf_convert.convert_many.
    """
    return convert(Path(model_dir), Path(out_path), ftype, name=name)


# ---------------------------------------------------------------------------------------------
# Measuring: perplexity and decode speed through llama-cpp-python, and the same for a torch model
# ---------------------------------------------------------------------------------------------


def load_gguf(path: Path, n_ctx: int = 0, threads: int = 2, logits_all: bool = False, kv_f32: bool = False):
    """A llama_cpp.Llama on `path` with explicit threads (the default is half the cores).

    llama.cpp keeps the KV cache in f16 by default (~5e-4 relative logit error); `kv_f32` keeps it
    in f32 for exact-parity checks.
    """
    import llama_cpp

    kv_type = llama_cpp.GGML_TYPE_F32 if kv_f32 else None  # None: llama.cpp's default (f16)
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
        seed=0,
        type_k=kv_type,
        type_v=kv_type,
    )


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed next-token negative log-likelihood of ids[1:] given logits[:-1] (float64 log-softmax)."""
    x = logits[: len(ids) - 1].astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    """All-position logits of `ids` from a Llama created with logits_all=True."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def gguf_perplexity(llm, docs: list[list[int]]) -> float:
    """Token-level perplexity over documents (each already tokenized with BOS, shorter than n_ctx)."""
    nll = sum(_nll(gguf_logits(llm, ids), ids) for ids in docs)
    return float(np.exp(nll / sum(len(ids) - 1 for ids in docs)))


def logit_parity(llm, model, docs: list[list[int]]) -> float:
    """max |llama.cpp logit - transformers logit| / max |transformers logit| over every position of `docs`."""
    import torch

    worst = 0.0
    with torch.inference_mode():
        for ids in docs:
            ref = model(torch.tensor([ids])).logits[0].float().numpy()
            worst = max(worst, float(np.abs(gguf_logits(llm, ids) - ref).max() / np.abs(ref).max()))
    return worst


def token_mismatches(llm, tok, texts: list[str]) -> list[str]:
    """The texts that llama.cpp tokenizes differently from the HF tokenizer (no special tokens either side)."""
    return [
        t
        for t in texts
        if llm.tokenize(t.encode(), add_bos=False, special=False) != tok(t, add_special_tokens=False)["input_ids"]
    ]


def torch_perplexity(model, docs: list[list[int]]) -> float:
    """The same perplexity for a transformers model (same token ids, same formula)."""
    import torch

    nll = 0.0
    with torch.inference_mode():
        for ids in docs:
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            nll += _nll(logits, ids)
    return float(np.exp(nll / sum(len(ids) - 1 for ids in docs)))


def gguf_decode_speed(llm, prompt_ids: list[int], new_tokens: int = 128) -> float:
    """Greedy decode tokens/s after the prompt (prefill excluded: the clock starts at the first new token)."""
    import time

    llm.reset()
    t_first, n = 0.0, 0
    for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        n += 1
        if n == 1:
            t_first = time.perf_counter()
        if n >= new_tokens:
            break
    return (n - 1) / max(time.perf_counter() - t_first, 1e-9)


def torch_decode_speed(model, prompt_ids: list[int], new_tokens: int = 128) -> float:
    """Greedy decode tokens/s of transformers generate(): (N-1) tokens over time(N) - time(1)."""
    import time

    import torch

    ids = torch.tensor([prompt_ids])
    # use_cache=True: pretraining saves use_cache=false in config.json, and without a KV cache
    # generate() recomputes the whole prefix every step (an unfair, O(n^2) baseline)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)

    def timed(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t

    timed(2)  # warm-up
    return (new_tokens - 1) / max(timed(new_tokens) - timed(1), 1e-9)
