"""The model-family matrix: tiny random-init models of the families users bring, built here from transformers
config classes (no downloads), each saved with a byte-level BPE tokenizer trained in the test session.

Every family gets the same shape (2 layers, width 64, 4 heads, 2 KV heads where the family has GQA) so a
skill's behavioural check costs about the same on each. `llama3_tokenizer` trains a tokenizer whose
pre-tokenizer is Llama-3's split regex, the case that proves GGUF pre-tokenizer detection reads the
tokenizer's own definition rather than assuming GPT-2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The families every skill that takes a model is tested on, in the order the support table lists them.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2")

# Llama-3's pre-tokenizer split pattern, as its tokenizer.json writes it.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WIDTH, _LAYERS, _HEADS, _KV_HEADS, _FFN, _CONTEXT = 64, 2, 4, 2, 128, 256


def family_config(family: str, tok: Any, layers: int = _LAYERS) -> Any:
    """A tiny transformers config of `family` sized to `tok`'s vocabulary, with its special token ids
    (`layers` decoder blocks: a deeper target and a 1-layer draft share the family and tokenizer)."""
    import transformers

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vocab = len(tok)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_embd=_WIDTH, n_layer=layers, n_head=_HEADS, n_positions=_CONTEXT, **ids
        )
    common = dict(
        vocab_size=vocab,
        hidden_size=_WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS,
        intermediate_size=_FFN,
        max_position_embeddings=_CONTEXT,
        tie_word_embeddings=family in ("qwen2", "qwen3", "gemma2"),  # as the small hub checkpoints do
        **ids,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=_WIDTH // _HEADS)
    if family == "gemma2":
        # query_pre_attn_scalar = head_dim, as every hub Gemma 2 has (llama.cpp always scales by 1/sqrt(head_dim))
        head_dim = _WIDTH // _HEADS
        return transformers.Gemma2Config(
            **common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=_CONTEXT
        )
    if family == "phi3":
        common["num_key_value_heads"] = _HEADS  # phi3's fused qkv_proj: the converter expects full heads
        return transformers.Phi3Config(**common, original_max_position_embeddings=_CONTEXT)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def build_family_model(family: str, tokenizer_dir: Path, out_dir: Path, seed: int = 0, layers: int = _LAYERS) -> Path:
    """Save a random-init `family` model (fp32, seeded) with the tokenizer from `tokenizer_dir` into out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tok, layers), dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def train_llama3_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE whose pre-tokenizer is Llama-3's: Split(regex, isolated) then ByteLevel without regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from skillbook.ml import tokenizer_utils as tu

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = [tu.UNK, tu.BOS, tu.EOS, tu.PAD, *tu.ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tu.batches(texts), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tu.wrap(backend, model_max_length=_CONTEXT).save_pretrained(out_dir)
    return out_dir
