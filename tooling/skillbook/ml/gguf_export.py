"""Write an HF Llama checkpoint (with its byte-level BPE tokenizer) as a GGUF file llama.cpp loads.

The `gguf` package does the file format and the Q8_0/Q4_0 block quantization; this module only
maps names, permutes the q/k projections into llama.cpp's rotary layout and fills the metadata
llama.cpp requires. K-quants (Q4_K_M …) are made from an F16/F32 file by llama.cpp's own quantizer
(`quantize_gguf`, through llama-cpp-python), because the Python package cannot produce them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# File types written directly by the gguf package, and those that need llama.cpp's quantizer.
DIRECT_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
LLAMA_CPP_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")
ALL_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")

# HF parameter suffix -> GGUF tensor name suffix, per transformer block.
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows as [all real halves | all imaginary halves] per head; llama.cpp interleaves pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str | None:
    """The llama.cpp tensor name for an HF Llama parameter (None for buffers llama.cpp recomputes)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        suffix = ".".join(parts[3:])
        if suffix in _BLOCK_NAMES:
            return f"blk.{parts[2]}.{_BLOCK_NAMES[suffix]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"unexpected parameter {hf_name!r}: only the Llama architecture is supported")


def _rope_theta(cfg) -> float:
    """rope_theta lives in `rope_parameters` (transformers 5) or at the top level (4.x)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def _vocab(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int], list[str], dict]:
    """Tokens (by id), token types, merges and special ids from tokenizer.json (GPT-2 style byte-level BPE)."""
    import gguf

    tj = json.loads((model_dir / "tokenizer.json").read_text())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ValueError(
            f"{model_dir}: tokenizer model is {model.get('type')}; the GGUF writer handles byte-level BPE only"
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    tokens, types = [], []
    for i in range(n_vocab):  # the embedding may be padded past the tokenizer: fill with unused tokens
        if i in by_id:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(
                gguf.TokenType.NORMAL
                if a is None
                else gguf.TokenType.CONTROL
                if a.get("special")
                else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if "Digits" in json.dumps(tj.get("pre_tokenizer")):
        # llama.cpp has no pre type for "GPT-2 regex + one digit per pre-token"; ids differ on numbers
        import logging

        logging.getLogger(__name__).warning("tokenizer splits digits; llama.cpp's gpt-2 pre-tokenizer will not")
    return tokens, [int(t) for t in types], merges, tj


def _tensor_type(name: str, arr: np.ndarray, ftype: str):
    """Target ggml type of one tensor: norms stay F32; rows not divisible by the block fall back to F16."""
    import gguf

    T = gguf.GGMLQuantizationType
    if arr.ndim == 1 or ftype == "F32":
        return T.F32
    if ftype == "F16":
        return T.F16
    qtype = T.Q8_0 if ftype == "Q8_0" else T.Q4_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if arr.shape[-1] % block == 0 else T.F16


def write_gguf(model_dir: Path, out_path: Path, ftype: str = "F16", name: str | None = None) -> dict:
    """Convert an HF Llama dir (weights + tokenizer) into one GGUF file; returns a summary dict."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if ftype not in DIRECT_TYPES:
        raise ValueError(f"write_gguf writes {DIRECT_TYPES}; make {ftype} with quantize_gguf() from an F16 file")
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type != "llama":
        raise ValueError(f"{model_dir}: model_type is {cfg.model_type!r}; the GGUF writer handles 'llama' only")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, torch.nn.Embedding)  # LlamaModel.embed_tokens
    n_vocab = embeddings.num_embeddings  # may be padded past the tokenizer's vocab

    w = gguf.GGUFWriter(out_path, "llama")
    _add_hyperparameters(w, cfg, name or model_dir.name, n_vocab, ftype)
    n_merges = _add_tokenizer(w, tok, model_dir, n_vocab)
    n_params, n_bytes, counts = _add_tensors(w, model.state_dict(), cfg, ftype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {
        "path": str(out_path),
        "type": ftype,
        "n_params": int(n_params),
        "tensor_bytes": int(n_bytes),
        "file_bytes": out_path.stat().st_size,
        "bits_per_weight": 8.0 * n_bytes / n_params,
        "tensor_types": counts,
        "n_vocab": n_vocab,
        "n_merges": n_merges,
    }


def _heads(cfg) -> tuple[int, int, int]:
    """Query heads, key/value heads and the head size of a Llama config."""
    n_head = cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    return n_head, n_kv, head_dim


def _add_hyperparameters(w, cfg, name: str, n_vocab: int, ftype: str) -> None:
    """llama.cpp refuses files without the four lengths, and its rope dims must equal the head size."""
    import gguf

    n_head, n_kv, head_dim = _heads(cfg)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(n_vocab)
    w.add_file_type(getattr(gguf.LlamaFileType, {"F32": "ALL_F32", "F16": "MOSTLY_F16"}.get(ftype, f"MOSTLY_{ftype}")))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(w, tok, model_dir: Path, n_vocab: int) -> int:
    """A GPT-2 style vocab (tokens + types + merges) with the GPT-2 pre-tokenizer regex; returns the merge count."""
    tokens, types, merges, _ = _vocab(model_dir, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # HF ByteLevel(use_regex=True) splits text with exactly GPT-2's regex
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for kind in ("bos", "eos", "pad", "unk"):  # written explicitly: llama.cpp guesses wrong ids otherwise
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(int(tid))
    # llama.cpp prepends BOS when asked; mirror what tok(text) does instead of trusting a config flag
    probe = tok("a")["input_ids"]
    w.add_add_bos_token(bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id)
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    return len(merges)


def _add_tensors(w, state_dict: dict, cfg, ftype: str) -> tuple[int, int, dict[str, int]]:
    """Every weight under its llama.cpp name, q/k permuted to the rotary layout, in its target type.

    Returns the parameter count, the tensor bytes and how many tensors of each ggml type were written.
    """
    import gguf

    n_head, n_kv, _ = _heads(cfg)
    n_params, n_bytes = 0, 0
    counts: dict[str, int] = {}
    for hf_name, p in state_dict.items():
        gname = gguf_name(hf_name)
        if gname is None or (gname == "output.weight" and cfg.tie_word_embeddings):
            continue  # tied output: llama.cpp reuses token_embd
        arr = p.detach().float().numpy()
        if gname.endswith("attn_q.weight"):
            arr = permute_rotary(arr, n_head)
        elif gname.endswith("attn_k.weight"):
            arr = permute_rotary(arr, n_kv)
        qtype = _tensor_type(gname, arr, ftype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        n_params += arr.size
        if qtype == gguf.GGMLQuantizationType.F32:
            data = arr.astype(np.float32)
            w.add_tensor(gname, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            data = arr.astype(np.float16)
            w.add_tensor(gname, data)
        else:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
        n_bytes += data.nbytes
    return n_params, n_bytes, counts


def quantize_gguf(src: Path, dst: Path, qtype: str = "Q4_K_M", threads: int = 2) -> dict:
    """Quantize an F16/F32 GGUF with llama.cpp's own quantizer (K-quants need rows divisible by 256)."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        raise ValueError(f"llama.cpp has no file type {qtype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {qtype}) failed with code {rc}")
    return {
        "path": str(dst),
        "type": qtype,
        "file_bytes": Path(dst).stat().st_size,
        "tensor_types": gguf_tensor_types(dst),
    }


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds (shows K-quant fallbacks)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def gguf_bits_per_weight(path: Path) -> float:
    """Bits per weight over all tensors of a GGUF file (tensor data only, not metadata)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    return 8.0 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


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
