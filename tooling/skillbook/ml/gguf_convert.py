"""HF model dir -> GGUF by llama.cpp's own converter (`convert_hf_to_gguf.py` and its `conversion/` package).

The converter maps every architecture llama.cpp runs (its TEXT_MODEL_MAP: Llama, Mistral, Qwen2/3, Gemma,
Phi-3, GPT-2 and 100+ more); `make setup` extracts it from the llama-cpp-python sdist of the locked version
into `.venv/llama.cpp-convert/`, so the file format always matches the llama.cpp that loads it. It runs in a
subprocess (gguf_convert_worker.py) because it brings its own `gguf` package, newer than pip's.

One thing it cannot know is a new tokenizer's pre-tokenizer: it hashes the ids of a probe text and looks
the hash up in a table of published models. For a tokenizer it does not know (every tokenizer trained
here) the answer comes from tokenizer.json's own `pre_tokenizer` definition (`pre_tokenizer_from_json`),
recognised exactly or refused. K-quants and Q4_0 come from llama.cpp's quantizer on an F16/F32 file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from skillbook.errors import ConfigError, SkillbookError

CONVERTER_ENV = "SKILLBOOK_LLAMA_CONVERTER"


class ConversionMismatch(SkillbookError):
    """A written GGUF whose token ids or logits differ from transformers' (the file is not kept as correct)."""


CONVERTER_TYPES = ("F32", "F16", "BF16", "Q8_0")  # written by the converter itself
QUANTIZER_TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")  # llama.cpp's quantizer, from an F16 (or F32) file
ALL_TYPES = CONVERTER_TYPES + QUANTIZER_TYPES

# The split regexes of the pre-tokenizers recognised from tokenizer.json, as HF tokenizers write them.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def converter_dir() -> Path:
    """Where convert_hf_to_gguf.py lives: $SKILLBOOK_LLAMA_CONVERTER, else the venv's copy."""
    env = os.environ.get(CONVERTER_ENV)
    path = Path(env) if env else Path(sys.prefix) / "llama.cpp-convert"
    if not (path / "convert_hf_to_gguf.py").is_file() or not (path / "conversion").is_dir():
        raise ConfigError(
            f"llama.cpp's converter is not at {path}: run `make setup` (it extracts convert_hf_to_gguf.py, "
            f"conversion/ and gguf-py/ from the llama-cpp-python sdist) or set {CONVERTER_ENV} to such a folder"
        )
    return path


def _describe(pt: dict | None) -> str:
    if not pt:
        return "none"
    if pt.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe(p) for p in pt.get("pretokenizers", [])) + "]"
    opts = {k: v for k, v in pt.items() if k in ("use_regex", "behavior", "individual_digits", "replacement")}
    return pt.get("type", "?") + (f"({json.dumps(opts)[1:-1]})" if opts else "")


def tokenizer_definition(model_dir: Path) -> dict:
    """The tokenizer as transformers runs it, in tokenizer.json form.

    Usually tokenizer.json itself, but a model-specific class may replace parts: transformers 5 loads a
    `qwen2` dir's tokenizer as Qwen2Tokenizer, which swaps in Qwen2's split regex and an NFC normalizer
    whatever tokenizer.json says. The GGUF must reproduce the ids users get from AutoTokenizer.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    backend = getattr(tok, "backend_tokenizer", None)
    return (
        json.loads(backend.to_str()) if backend is not None else json.loads((model_dir / "tokenizer.json").read_text())
    )


def pre_tokenizer_from_json(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, from its own definition.

    A lone ByteLevel(use_regex=true) is GPT-2's regex -> `gpt-2`; Split(Llama-3 regex, isolated) then
    ByteLevel(use_regex=false) -> `llama-bpe`; the same with Qwen2's regex -> `qwen2`. Anything else
    (a Digits split, Metaspace, a normalizer other than Qwen2's NFC) is refused by name.
    """
    pt = tj.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    norm = (tj.get("normalizer") or {}).get("type")

    def byte_level(step: dict, regex: bool) -> bool:
        return (
            step.get("type") == "ByteLevel"
            and bool(step.get("use_regex", True)) is regex
            and not step.get("add_prefix_space", False)
        )

    name = None
    if len(steps) == 1 and byte_level(steps[0], regex=True):
        name = "gpt-2"
    elif len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], regex=False):
        split = steps[0]
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            name = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}.get(str((split.get("pattern") or {}).get("Regex")))
    # llama.cpp applies no normalizer; Qwen2's NFC is the one it accepts (ids equal on NFC text, i.e. nearly all)
    if name is not None and (norm is None or (norm == "NFC" and name == "qwen2")):
        return name
    found = _describe(pt) + (f" after a {norm} normalizer" if norm else "")
    raise ConfigError(
        f"model: llama.cpp does not know this tokenizer's pre-tokenizer ({found}) and it is none of the ones "
        "recognised from tokenizer.json (ByteLevel with its regex -> gpt-2, Split(Llama-3 regex) + ByteLevel -> "
        "llama-bpe, Split(Qwen2 regex) + ByteLevel -> qwen2); a guess would change token ids silently, so no "
        "GGUF is written. Retrain the tokenizer with one of those pre-tokenizers (e.g. without split_digits)"
    )


# llama.cpp applies Phi-3's token fix-ups to any file whose general.name contains these, and they need these tokens
_PHI3_NAMES, _PHI3_TOKENS = ("phi-3", "phi3"), ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _faithful(model_dir: Path, tj: dict, name: str | None) -> tuple[str, str | None]:
    """Refuse what llama.cpp would run differently from transformers; returns (general.name, note)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") == "gemma2":
        n_head, width = cfg["num_attention_heads"], cfg["hidden_size"]
        scale_dim = width // n_head if cfg.get("num_hidden_layers") == 46 else cfg.get("head_dim", width // n_head)
        if cfg.get("query_pre_attn_scalar", scale_dim) != scale_dim:
            raise ConfigError(
                f"model: gemma2 config has query_pre_attn_scalar={cfg['query_pre_attn_scalar']} but llama.cpp's gemma2 "
                f"scales queries by 1/sqrt({scale_dim}) (head_dim; n_embd/n_head for the 46-layer 27B) and has no key "
                "for another value; the GGUF's logits would differ, so none is written"
            )
    vocab = set((tj.get("model") or {}).get("vocab") or {}) | {a["content"] for a in tj.get("added_tokens", [])}
    missing = [t for t in _PHI3_TOKENS if t not in vocab]
    final = name or model_dir.name
    if not any(k in final.lower() for k in _PHI3_NAMES) or not missing:
        return final, None
    if name is not None:
        raise ConfigError(
            f"name: {name!r} contains 'phi3'/'phi-3', which makes llama.cpp apply Phi-3's tokenizer fix-ups, and this "
            f"vocab lacks {missing} that they need (llama.cpp would not load the file); choose another name"
        )
    safe = final.lower().replace("phi-3", "phi_3").replace("phi3", "phi_3")
    return safe, f"general.name {safe!r}, not {final!r}: llama.cpp keys Phi-3 tokenizer fix-ups on the name"


def _worker(model_dir: Path, outputs: list[tuple[str, Path]], name: str | None) -> dict:
    """Run the converter subprocess; map its refusals to ConfigError and any crash to RuntimeError."""
    model_dir = Path(model_dir)
    for f in ("config.json", "tokenizer.json"):
        if not (model_dir / f).is_file():
            raise ConfigError(f"model: {model_dir} has no {f}; the GGUF converter needs an hf-model dir with both")
    tj = tokenizer_definition(model_dir)
    name, note = _faithful(model_dir, tj, name)
    args: dict = {"converter": str(converter_dir()), "model_dir": str(model_dir), "name": name}
    try:
        args["pre_fallback"] = pre_tokenizer_from_json(tj)
    except ConfigError as e:
        args["pre_refusal"] = str(e)  # used only when llama.cpp's own hash table does not know the tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        args |= {"result": str(result_file), "outputs": [[t, str(p)] for t, p in outputs]}
        worker = Path(__file__).with_name("gguf_convert_worker.py")
        proc = subprocess.run([sys.executable, str(worker), json.dumps(args)], capture_output=True, text=True)
        if proc.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"llama.cpp's converter failed on {model_dir}:\n{proc.stderr[-3000:]}")
        res = json.loads(result_file.read_text())
    if res.get("error") == "architecture":
        raise ConfigError(
            f"model: architecture {res['architecture']!r} is not supported by this llama.cpp (its converter "
            f"knows {res['n_known']} architectures; `{converter_dir() / 'convert_hf_to_gguf.py'} "
            "--print-supported-models` lists them)"
        )
    if res.get("error") == "pre_tokenizer":
        raise ConfigError(res["message"])
    return res | {"name": name, "name_note": note}


def convert(model_dir: Path, out_path: Path, outtype: str = "F16", name: str | None = None) -> dict:
    """One GGUF of `outtype`; see convert_many."""
    return convert_many(model_dir, {outtype: out_path}, name=name)[outtype]


def convert_many(model_dir: Path, outputs: dict[str, Path], name: str | None = None) -> dict[str, dict]:
    """Write each {outtype: path} GGUF (one converter run for all); returns per-type summaries.

    Files are written under a temporary name and renamed when complete; on any failure nothing is left.
    Quantizer types are made from the F16 file (a temporary one when F16 itself is not wanted). Refusals
    (architecture, pre-tokenizer, the unfaithful cases in `_faithful`) come before the first byte is written.
    """
    bad = [t for t in outputs if t not in ALL_TYPES]
    if bad:
        raise ConfigError(f"type: {bad} unknown; GGUF types are {', '.join(ALL_TYPES)}")
    outputs = {t: Path(p) for t, p in outputs.items()}
    direct = {t: p for t, p in outputs.items() if t in CONVERTER_TYPES}
    quant = {t: p for t, p in outputs.items() if t in QUANTIZER_TYPES}
    temps = {t: p.with_name(f".{p.name}.partial") for t, p in outputs.items()}
    base = next(iter(outputs.values()))
    if quant and "F16" not in direct:
        temps["F16-intermediate"] = base.with_name(f".{base.stem}-F16.gguf.partial")
    try:
        conv = [(t, temps[t]) for t in direct] + (
            [("F16", temps["F16-intermediate"])] if "F16-intermediate" in temps else []
        )
        res = _worker(model_dir, conv, name)
        src = temps.get("F16-intermediate") or temps.get("F16")
        for t in quant:
            assert src is not None  # an F16 file is always written when a quantizer type is wanted
            quantize_gguf(src, temps[t], t)
        for t, p in outputs.items():
            temps[t].replace(p)
    finally:
        for p in temps.values():
            p.unlink(missing_ok=True)
    return {
        t: {
            "path": str(p),
            "type": t,
            "file_bytes": p.stat().st_size,
            "bits_per_weight": gguf_bits_per_weight(p),
            "tensor_types": gguf_tensor_types(p),
            "architecture": res["architecture"],
            "pre_tokenizer": res["pre"],
            "pre_tokenizer_source": res["pre_source"],
            "name": res["name"],
            "name_note": res["name_note"],
        }
        for t, p in outputs.items()
    }


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
