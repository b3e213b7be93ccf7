"""Tokenizer helpers every recipe can reuse: Skillbook's special tokens, chat template, loading, bytes/token.

The tokenization skill writes tokenizers with these tokens and this template; pretraining, SFT and
DPO read them back with `load_tokenizer`. Keep train and serve on the same template: a model trained
on one role format and prompted with another quietly loses most of what SFT taught it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from skillbook.errors import SkillbookError

# Special tokens: ids 0-3 in every tokenizer the tokenization skill trains, role markers right after.
UNK, BOS, EOS, PAD = "<|unk|>", "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = {"unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}

# One turn is `<|role|>\n{content}`; user and system turns end with "\n", assistant turns with EOS so the
# model learns to stop. BOS comes from the template, once, at the very start. Plain Jinja only: no
# `{% generation %}` tag, which transformers understands but llama-cpp-python's jinja2 rejects. The prompt
# rendered with add_generation_prompt=True is a prefix of the full chat, so "loss on the completion only"
# is a matter of masking the prompt's length.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('chat roles are system, user and assistant; got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ message['content'] + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def read_texts(path: Path, limit: int | None = None) -> Iterator[str]:
    """The documents of one corpus file (at most `limit`): "text" of .jsonl/.json/.parquet rows, or .txt
    paragraphs (skillbook.ml.data_files.iter_texts); a malformed file is one ConfigError naming the line."""
    from skillbook.ml.data_files import iter_texts

    return iter_texts(Path(path), "corpus", limit)


def batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    """Group texts for `train_from_iterator`: batches keep the Rust side busy without holding the corpus in RAM."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def wrap(
    tokenizer_object,
    specials: dict[str, str] | None = None,
    extra: Iterable[str] = (),
    add_bos: bool = True,
    model_max_length: int = 2048,
):
    """A `tokenizers.Tokenizer` -> transformers fast tokenizer with special tokens and our chat template.

    `specials` maps unk_token/bos_token/eos_token/pad_token to strings already in the vocab. With
    `add_bos`, `tok(text)` prepends BOS (as Llama does); `apply_chat_template(..., tokenize=True)`
    tokenizes without specials, so the template's own BOS is the only one.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = dict(specials or SPECIAL_TOKENS)
    bos = specials["bos_token"]
    if add_bos:
        bos_id = tokenizer_object.token_to_id(bos)
        tokenizer_object.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        model_max_length=model_max_length,
        additional_special_tokens=[*ROLE_TOKENS, *extra],
        **specials,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | Path, what: str = "tokenizer"):
    """AutoTokenizer.from_pretrained on a local dir, failing with one clear message if it is not one."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise SkillbookError(
            f"{what}: {path} is not a tokenizer directory (no tokenizer.json); pass the "
            f"'tokenizer' output of `skills run tokenization` or an hf-model directory"
        )
    return AutoTokenizer.from_pretrained(str(path))


def bytes_per_token(tokenizer, texts: Iterable[str]) -> tuple[float, int, int]:
    """(UTF-8 bytes / token, total bytes, total tokens) over `texts`, special tokens not counted."""
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.encode(text, add_special_tokens=False))
    return (n_bytes / n_tokens if n_tokens else 0.0), n_bytes, n_tokens


def tokenizer_mismatch(target_dir: str | Path, draft_dir: str | Path) -> str | None:
    """Why two models' tokenizers are not interchangeable (None = same vocabulary and special ids).

    Speculative decoding and distillation compare token ids across two models, so both must map every
    string to the same ids.
    """
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(str(target_dir)), AutoTokenizer.from_pretrained(str(draft_dir))
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        differ = sorted(set(va.items()) ^ set(vb.items()))[:3]
        return f"vocabularies differ ({len(va)} vs {len(vb)} tokens; e.g. {differ})"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, name) != getattr(b, name):
            return f"{name} differs ({getattr(a, name)} vs {getattr(b, name)})"
    return None
