"""Tokenization: train a byte-level BPE (or SentencePiece) tokenizer on a corpus and save it for AutoTokenizer.

Reads a `corpus` (a folder with train.jsonl / val.jsonl of {"text"}, or one .jsonl/.json/.parquet/.txt
file split by val_fraction), trains with HF `tokenizers` (default)
or the `sentencepiece` library, adds BOS/EOS/PAD/UNK, role markers and a chat template, saves a
directory that `AutoTokenizer.from_pretrained` loads, and measures bytes/token and the round trip
decode(encode(x)) == x on the validation split.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from skillbook.errors import ConfigError
from skillbook.ml import tokenizer_utils as tu
from skillbook.ml.data_files import CorpusPath, corpus_sources
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"tokenizer": "tokenizer"}
INPUTS = {"corpus": "corpus"}


class SpecialTokens(BaseModel):
    """The four special tokens; they take ids 0-3, then the role markers of the chat template follow."""

    model_config = ConfigDict(extra="forbid")
    unk: str = Field(
        tu.UNK,
        description="Unknown token (id 0). Byte-level BPE never emits it; SentencePiece might without byte fallback.",
    )
    bos: str = Field(
        tu.BOS,
        description="Beginning of sequence (id 1): prepended by tok(text) when add_bos, and by the chat template.",
    )
    eos: str = Field(
        tu.EOS, description="End of sequence (id 2): ends every document in pretraining and every assistant turn."
    )
    pad: str = Field(tu.PAD, description="Padding (id 3): a token of its own, so padding is never confused with EOS.")
    extra: list[str] = Field(
        default_factory=list,
        description="More reserved special tokens (e.g. tool-call markers), added after the role markers.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> SpecialTokens:
        """Every special token is a non-empty string used once (role markers included)."""
        tokens = [self.unk, self.bos, self.eos, self.pad, *tu.ROLE_TOKENS, *self.extra]
        if any(not t.strip() for t in tokens):
            raise ValueError("special tokens must be non-empty")
        if len(set(tokens)) != len(tokens):
            raise ValueError(
                f"special tokens must be distinct (pad == eos hides every EOS from the loss); got {tokens}"
            )
        return self


class Config(RecipeConfig):
    corpus: CorpusPath | None = Field(
        None,
        description=(
            'Corpus: a folder with train.jsonl and val.jsonl ({"text": ...} per line), or one .jsonl/.json/.parquet '
            "file of {text} rows or a .txt file (a document per blank-line-separated paragraph), split by "
            "val_fraction; None = the embedded synthetic world."
        ),
    )
    val_fraction: float = Field(
        0.05, gt=0, le=0.5, description="Share of a single corpus file held out for validation (seeded by seed)."
    )
    algorithm: Literal["byte-bpe", "sentencepiece-unigram", "sentencepiece-bpe"] = Field(
        "byte-bpe",
        description=(
            "byte-bpe: HF tokenizers ByteLevel BPE (GPT-2/Llama-3 style, lossless); "
            "sentencepiece-*: the sentencepiece library with byte fallback (Llama-2/T5 style)."
        ),
    )
    vocab_size: int = Field(
        1024,
        ge=300,
        le=1_048_576,
        description=(
            "Target vocabulary size including specials. The tiny world saturates below 1,024 (every word is a token); "
            "real models use 32000-262144."
        ),
    )
    min_frequency: int = Field(
        2,
        ge=0,
        description="A pair must occur this often to be merged (byte-bpe); stops training early on small corpora.",
    )
    split_digits: bool = Field(
        False,
        description=(
            "Put every digit in its own pre-token (Llama-style): better arithmetic, ~10% more tokens on this corpus."
        ),
    )
    add_bos: bool = Field(
        True,
        description=(
            "tok(text) prepends BOS. The chat template adds BOS itself, so tokenize rendered chats with "
            "add_special_tokens=False."
        ),
    )
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens, description="Special token strings.")
    max_train_docs: int | None = Field(
        None,
        ge=1,
        description=(
            "Train on a seeded random sample of this many documents (reservoir sampling, one pass); "
            "None = every document."
        ),
    )
    model_max_length: int = Field(
        2048, ge=16, description="Longest sequence the downstream model accepts; stored in tokenizer_config.json."
    )
    seed: int = Field(0, description="Seed for the default data and document sampling.")


# ---------------------------------------------------------------------------------------------
# Data: the documents to train on, streamed (or sampled) so large corpora never sit in memory
# ---------------------------------------------------------------------------------------------


def training_texts(source: Path | Iterable[str], max_docs: int | None, seed: int) -> Iterator[str]:
    """Every document of a corpus file (or of the texts given), or a uniform random sample of `max_docs` of them
    (reservoir sampling)."""
    texts = tu.read_texts(source) if isinstance(source, Path) else source
    if max_docs is None:
        yield from texts
        return
    rng, sample = random.Random(seed), []
    for n, text in enumerate(texts):
        if n < max_docs:
            sample.append(text)
        elif (j := rng.randrange(n + 1)) < max_docs:
            sample[j] = text
    yield from sample


# ---------------------------------------------------------------------------------------------
# Trainers: both return a `tokenizers.Tokenizer`, the object transformers wraps as a fast tokenizer
# ---------------------------------------------------------------------------------------------


def train_byte_bpe(cfg: Config, texts: Iterator[str], specials: list[str]):
    """GPT-2-style BPE: bytes -> 256 base tokens, GPT-2 regex pre-tokenizer, no normalizer (lossless)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False)]  # a prefix space would break the round trip
    if cfg.split_digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones: no UNK ever
        show_progress=False,
    )
    tok.train_from_iterator(tu.batches(texts), trainer=trainer)
    return tok


def train_sentencepiece(cfg: Config, texts: Iterator[str], specials: list[str], out: Path):
    """sentencepiece trains; transformers' converter turns the .model into a `tokenizers.Tokenizer`."""
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)  # sampling and shuffling inside the trainer
    try:
        _spm_train(spm, cfg, texts, specials, model)
    except RuntimeError as exc:  # e.g. vocab_size below 256 byte pieces + specials + every character seen
        raise ConfigError(
            f"vocab_size={cfg.vocab_size}: sentencepiece refused it: {str(exc).split('] ')[-1]}"
        ) from None
    path = out / "sentencepiece.model"  # kept next to tokenizer.json for tools that want the original
    path.write_bytes(model.getvalue())
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model.getvalue())
    vocab_ids, vocab_scores, merges = SentencePieceExtractor(str(path)).extract()
    vocab = vocab_ids if cfg.algorithm == "sentencepiece-bpe" else vocab_scores
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, merges), path


def _spm_train(spm, cfg: Config, texts: Iterator[str], specials: list[str], model: io.BytesIO) -> None:
    """One sentencepiece training call with the settings that keep it lossless."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=texts,
        model_writer=model,
        model_type=cfg.algorithm.split("-")[1],
        vocab_size=cfg.vocab_size,
        hard_vocab_limit=False,  # small corpora cannot fill a large vocab
        character_coverage=1.0,
        byte_fallback=True,  # rare characters become <0xNN> byte pieces, never UNK
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,  # lossless
        split_digits=cfg.split_digits,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=specials[0],
        bos_piece=specials[1],
        eos_piece=specials[2],
        pad_piece=specials[3],
        user_defined_symbols=specials[4:],
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 20,
        num_threads=2,
        minloglevel=2,
    )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    """Train, wrap with specials + chat template, save, reload with AutoTokenizer and measure."""
    from transformers import AutoTokenizer

    ctx.progress(4, "tokenization")
    # ---- corpus: given, or generated into the run dir -------------------------------------------
    if cfg.corpus is None:
        from skillbook.ml.synthetic import write_default_data

        corpus = write_default_data(ctx.out_dir / "data", cfg.seed)["corpus"]
        ctx.info(f"no corpus given: wrote the embedded synthetic world to {corpus}")
    else:
        corpus = artifact_path(cfg.corpus, "corpus")
    # a folder's train split is streamed; one file is split by val_fraction (every line checked here, first)
    train_texts, val, note = corpus_sources(corpus, "corpus", cfg.val_fraction, cfg.seed)
    ctx.info(note)
    ctx.log(step=1)

    # ---- train ----------------------------------------------------------------------------------
    st = cfg.special_tokens
    specials = [st.unk, st.bos, st.eos, st.pad, *tu.ROLE_TOKENS, *st.extra]  # ids follow this order
    out = ctx.out_dir / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    texts = training_texts(train_texts, cfg.max_train_docs, cfg.seed)
    t0 = time.time()
    if cfg.algorithm == "byte-bpe":
        backend, spm_path = train_byte_bpe(cfg, texts, specials), None
    else:
        backend, spm_path = train_sentencepiece(cfg, texts, specials, out)
    train_s = time.time() - t0
    size = backend.get_vocab_size()
    ctx.info(f"trained {cfg.algorithm} in {train_s:.1f}s: {size} tokens (asked for {cfg.vocab_size})")
    if size < cfg.vocab_size:
        ctx.info(
            f"the corpus ran out of pairs worth merging at {size} tokens; a larger vocab_size changes nothing "
            f"here (lower min_frequency or add data)"
        )
    ctx.log(step=2, vocab_size=size, train_seconds=round(train_s, 2))

    # ---- wrap and save: specials, BOS post-processor and chat template travel with the files ---
    named = {"unk_token": st.unk, "bos_token": st.bos, "eos_token": st.eos, "pad_token": st.pad}
    hf = tu.wrap(backend, named, st.extra, add_bos=cfg.add_bos, model_max_length=cfg.model_max_length)
    hf.save_pretrained(out)
    ctx.log(step=3)

    # ---- measure on the validation split, through the reloaded tokenizer (what users get) ------
    tok = AutoTokenizer.from_pretrained(str(out))
    bpt, n_bytes, n_tokens = tu.bytes_per_token(tok, val)
    round_trip = sum(tok.decode(tok.encode(t, add_special_tokens=False)) == t for t in val) / max(len(val), 1)
    ctx.summary.update(
        vocab_size=len(tok),
        bytes_per_token=round(bpt, 4),
        round_trip=round(round_trip, 4),
        val_docs=len(val),
        val_tokens=n_tokens,
        train_seconds=round(train_s, 2),
    )
    agree = None
    if spm_path is not None:  # does the converted tokenizer split exactly like sentencepiece itself?
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        agree = sum(sp.encode(t) == tok.encode(t, add_special_tokens=False) for t in val) / max(len(val), 1)
        ctx.summary["sentencepiece_agreement"] = round(agree, 4)
    ctx.log(step=4, bytes_per_token=bpt, round_trip=round_trip)
    ctx.info(f"val: {bpt:.2f} bytes/token over {len(val)} docs, round trip {round_trip:.1%}; tokenizer at {out}")
    ctx.report(report(cfg, tok, val, size, bpt, n_bytes, n_tokens, round_trip, agree, out))
    return {"tokenizer": out}


def report(
    cfg: Config,
    tok,
    val: list[str],
    size: int,
    bpt: float,
    n_bytes: int,
    n_tokens: int,
    round_trip: float,
    agree: float | None,
    out: Path,
) -> str:
    """report.md: the numbers, one validation document cut into tokens, and how to load it."""
    sample = val[0] if val else ""
    pieces = [tok.decode([i]) for i in tok.encode(sample, add_special_tokens=False)[:40]]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is Mira's kite?"}], tokenize=False, add_generation_prompt=True
    )
    rows = [
        ("algorithm", cfg.algorithm),
        ("vocab size (asked / trained / with specials)", f"{cfg.vocab_size} / {size} / {len(tok)}"),
        ("validation bytes / token", f"{bpt:.3f}"),
        ("validation bytes, tokens", f"{n_bytes}, {n_tokens}"),
        ("round trip decode(encode(x)) == x", f"{round_trip:.1%}"),
        (
            "special ids (unk, bos, eos, pad)",
            f"{tok.unk_token_id}, {tok.bos_token_id}, {tok.eos_token_id}, {tok.pad_token_id}",
        ),
    ]
    if agree is not None:
        rows.append(("same ids as sentencepiece itself", f"{agree:.1%}"))
    lines = [
        "# Tokenization run",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "A validation document, token by token (`|` marks boundaries):",
        "",
        "```text",
        "|".join(pieces),
        "```",
        "",
        "The chat template renders a user turn plus generation prompt as:",
        "",
        "```text",
        chat,
        "```",
        "",
        "Load it:",
        "",
        "```python",
        "from transformers import AutoTokenizer",
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})",
        "```",
        "",
    ]
    return "\n".join(lines)
