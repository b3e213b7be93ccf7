"""Subprocess side of skillbook.ml.gguf_convert: run llama.cpp's own converter classes on one HF model dir.

Run as a script (never imported by the project): its first steps put the converter's directory and its own
`gguf-py` first on sys.path, so `import gguf` here is llama.cpp's copy, not the pip `gguf` that the parent
process reads files with. Argument: one JSON object {converter, model_dir, outputs: [[outtype, path], ...],
name, pre_fallback, pre_refusal}. It writes {"ok": ...} or {"error": kind, ...} as JSON to `result`.

Everything that can refuse (architecture, pre-tokenizer) is checked before the first tensor is read.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any


def _load(converter: Path) -> Any:
    here = Path(__file__).resolve().parent  # a script's folder leads sys.path: its siblings must not shadow modules
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(converter / "gguf-py"))
    sys.path.insert(0, str(converter))
    import conversion

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("hf-to-gguf").setLevel(logging.ERROR)  # its unknown-hash banner: we answer it ourselves
    return conversion


def _known_pre(conversion: Any, model_dir: Path) -> str | None:
    """llama.cpp's own answer: the pre-tokenizer its hash table has for this tokenizer, None if unknown."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    try:
        return str(conversion.TextModel.get_vocab_base_pre(None, tok))  # the method does not use self
    except NotImplementedError:
        return None


def _model_class(base: Any, pre: str) -> Any:
    """The converter's class for this architecture, with two answers filled in from tokenizer.json."""

    class Model(base):
        model_arch = base.model_arch

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # GPT-2's converter reads n_ctx, which hub config.json files carry but transformers 5 no longer writes
            if "n_positions" in self.hparams:
                self.hparams.setdefault("n_ctx", self.hparams["n_positions"])

        def get_vocab_base_pre(self, tokenizer: Any) -> str:
            return pre

        def set_vocab(self) -> None:
            # A family whose converter reads a SentencePiece tokenizer.model (Gemma, Phi-3) but whose dir
            # holds a byte-level BPE tokenizer.json only: write that BPE vocab, as for any BPE model. The
            # class fails before adding anything when tokenizer.model is missing; checked, not assumed.
            kv_before = sum(len(kv) for kv in self.gguf_writer.kv_data)
            try:
                super().set_vocab()
            except (FileNotFoundError, ValueError) as e:
                no_spm = not (self.dir_model / "tokenizer.model").is_file()
                if not no_spm or "tokenizer.model" not in str(e):
                    raise
                if sum(len(kv) for kv in self.gguf_writer.kv_data) != kv_before:
                    raise
                self._set_vocab_gpt2()

    return Model


def main() -> int:
    args = json.loads(sys.argv[1])
    result_path = Path(args["result"])

    def answer(obj: dict) -> int:
        result_path.write_text(json.dumps(obj))
        return 0

    conversion = _load(Path(args["converter"]))
    import gguf
    import torch

    model_dir = Path(args["model_dir"])
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    known = sorted(conversion.TEXT_MODEL_MAP)
    if arch not in conversion.TEXT_MODEL_MAP:
        return answer({"error": "architecture", "architecture": arch, "n_known": len(known)})
    base = conversion.get_model_class(arch)

    # the pre-tokenizer matters to byte-level BPE vocabs only (SentencePiece and WordPiece have their own)
    bpe = json.loads((model_dir / "tokenizer.json").read_text())["model"].get("type") == "BPE"
    pre, source = (_known_pre(conversion, model_dir), "llama.cpp hash table") if bpe else (None, "not BPE")
    if bpe and pre is None:
        if args.get("pre_refusal"):
            return answer({"error": "pre_tokenizer", "message": args["pre_refusal"]})
        pre, source = args["pre_fallback"], "tokenizer.json pre_tokenizer"

    cls = _model_class(base, pre) if pre is not None else base
    ftypes = {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    written = []
    with torch.inference_mode():
        for outtype, path in args["outputs"]:
            model = cls(model_dir, ftypes[outtype], Path(path), model_name=args.get("name"))
            model.write()
            written.append(path)
    return answer({"ok": True, "architecture": arch, "pre": pre, "pre_source": source, "written": written})


if __name__ == "__main__":
    sys.exit(main())
