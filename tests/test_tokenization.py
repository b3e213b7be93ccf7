"""The tokenization skill: lossless byte-level BPE, reloadable tokenizers, chat template, real compression,
SentencePiece conversion, the from-scratch BPE agreeing with HF merge for merge, and early, clear errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import ROOT, output, run_skill
from skillbook.cli import main
from skillbook.errors import ConfigError
from skillbook.ml import bpe
from skillbook.ml import tokenizer_utils as tu
from skillbook.run import recipe

ODD_TEXT = (
    "Zürich's naïve café  —  costs €12,345.67!\n\n\tTabs,  double  spaces, emoji 🙂 and 日本語; it'll be DONE'd?   "
)


def val_docs(prepared: dict) -> list[str]:
    return list(tu.read_texts(output(prepared, "corpus") / "val.jsonl"))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_round_trip_is_lossless_on_val_docs_and_unseen_text(tok, prepared):
    docs = val_docs(prepared)
    assert len(docs) > 20
    for text in [*docs, ODD_TEXT]:  # byte-level: even characters never seen in training survive
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.unk_token_id not in tok.encode(ODD_TEXT, add_special_tokens=False)


def test_reloads_with_special_ids_and_chat_template(tok, tokenizer_dir):
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (tu.UNK, tu.BOS, tu.EOS, tu.PAD)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert len({tok.convert_tokens_to_ids(t) for t in tu.ROLE_TOKENS}) == 3
    assert tok.encode("Mira has a kite.")[0] == tok.bos_token_id  # add_bos: tok(text) starts with BOS

    chat = [{"role": "user", "content": "What colour is Mira's kite?"}, {"role": "assistant", "content": "red"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == "<|bos|><|user|>\nWhat colour is Mira's kite?\n<|assistant|>\nred<|eos|>"
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and tu.EOS not in prompt

    full = tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    head = tok.apply_chat_template(chat[:1], tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    assert full.count(tok.bos_token_id) == 1  # no double BOS: the template's BOS is the only one
    assert full[-1] == tok.eos_token_id  # the model is trained to emit EOS after every answer
    assert full[: len(head)] == head and tok.decode(full[len(head) :]) == "red" + tu.EOS  # prompt is a prefix

    import jinja2  # the template is plain Jinja: tools without transformers' extensions can render it

    plain = jinja2.Environment().from_string(tu.CHAT_TEMPLATE)
    assert plain.render(messages=chat, bos_token=tu.BOS, eos_token=tu.EOS, add_generation_prompt=False) == text
    with pytest.raises(Exception, match="roles"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_bytes_per_token_is_real_compression(tok, prepared):
    docs = val_docs(prepared)
    n_bytes = sum(len(d.encode()) for d in docs)
    n_tokens = sum(len(tok.encode(d, add_special_tokens=False)) for d in docs)
    assert n_bytes / n_tokens > 1.5
    assert tu.bytes_per_token(tok, docs)[0] == pytest.approx(n_bytes / n_tokens)


def test_run_summary_and_report(tokenizer_dir):
    run_dir = tokenizer_dir.parent
    summary = json.loads((run_dir / "outputs.json").read_text())["summary"]
    assert summary["round_trip"] == 1.0 and summary["bytes_per_token"] > 1.5
    assert 300 <= summary["vocab_size"] <= 1024
    assert "bytes / token" in (run_dir / "report.md").read_text()


def test_sentencepiece_unigram_loads_via_autotokenizer(prepared, tmp_path):
    from transformers import AutoTokenizer

    res = run_skill(
        "tokenization",
        tmp_path,
        {"corpus": str(output(prepared, "corpus")), "algorithm": "sentencepiece-unigram", "max_train_docs": 1500},
    )
    spm_tok = AutoTokenizer.from_pretrained(str(output(res, "tokenizer")))
    assert (spm_tok.unk_token_id, spm_tok.bos_token_id, spm_tok.eos_token_id, spm_tok.pad_token_id) == (0, 1, 2, 3)
    # The converted tokenizer splits exactly as sentencepiece does, and nothing is lost on the way back.
    assert res["summary"]["sentencepiece_agreement"] == 1.0 and res["summary"]["round_trip"] == 1.0
    docs = val_docs(prepared)
    assert all(spm_tok.decode(spm_tok.encode(d, add_special_tokens=False)) == d for d in docs[:50])
    assert res["summary"]["bytes_per_token"] > 1.5
    assert (
        spm_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "<|bos|><|user|>\nhi\n<|assistant|>\n"
    )


def test_from_scratch_bpe_learns_the_same_merges_as_hf(prepared):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = list(tu.read_texts(output(prepared, "corpus") / "train.jsonl", limit=400)) + [ODD_TEXT] * 3
    mine = bpe.train(texts, vocab_size=700, min_frequency=2)

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=700, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    model = json.loads(hf.to_str())["model"]
    hf_merges = [tuple(m) for m in model["merges"]]

    assert len(mine.merges) > 300
    assert mine.merges == hf_merges  # every merge, in order, ties included
    assert mine.vocab == model["vocab"]
    for text in [*texts[:50], ODD_TEXT]:
        assert [pre for pre, _ in hf.pre_tokenizer.pre_tokenize_str(text)] == bpe.pretokenize(text)
        assert mine.encode(text) == hf.encode(text).ids
        assert mine.decode(mine.encode(text)) == text


def test_typo_in_field_fails_with_one_message_and_no_run_dir(tmp_path):
    runs = tmp_path / "runs"
    res = CliRunner().invoke(main, ["run", "tokenization", "--set", "vocab_sise=100", "--runs-dir", str(runs)])
    assert res.exit_code != 0
    assert res.output.count("error:") == 1
    assert "vocab_sise" in res.output and "did you mean 'vocab_size'" in res.output
    assert not runs.exists()


def test_missing_corpus_fails_with_a_clear_message(tmp_path):
    missing = tmp_path / "no-such-corpus"
    res = CliRunner().invoke(
        main, ["run", "tokenization", "--set", f"corpus={missing}", "--runs-dir", str(tmp_path / "runs")]
    )
    assert res.exit_code != 0 and res.output.count("error:") == 1
    assert "corpus" in res.output and "does not exist" in res.output and str(missing) in res.output
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="train.jsonl"):
        run_skill("tokenization", tmp_path / "runs", {"corpus": str(tmp_path / "empty")})


def test_sampling_max_train_docs_is_seeded_and_bounded(tmp_path):
    mod = recipe.import_module(ROOT / "skills" / "tokenization" / "recipe.py", "tokenization")
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(500)))
    a = list(mod.training_texts(corpus, 50, seed=1))
    assert len(a) == 50 == len(set(a)) and a == list(mod.training_texts(corpus, 50, seed=1))
    assert a != list(mod.training_texts(corpus, 50, seed=2))
    assert max(int(t.split()[1]) for t in a) > 250  # a sample of the whole file, not its head


def test_special_tokens_must_be_distinct_and_sentencepiece_too_small_vocab_is_explained(prepared, tmp_path):
    rec = recipe.load(ROOT / "skills" / "tokenization")
    with pytest.raises(ConfigError, match="distinct"):
        recipe.resolve(rec, sets=[f"special_tokens.pad={tu.EOS}"])
    with pytest.raises(ConfigError, match="vocab_size=300: sentencepiece refused it"):
        run_skill(
            "tokenization",
            tmp_path,
            {"corpus": str(output(prepared, "corpus")), "algorithm": "sentencepiece-bpe", "vocab_size": 300},
        )
