"""The evaluation skill and skillbook.ml.evaluate: metrics move the right way on models we train here.

A tiny Llama (hidden 64, 2 layers) with a byte-level BPE tokenizer is trained for a few seconds
on a fixed set of facts and their questions; its untrained init (same config, same tokenizer)
is the baseline. Perplexity, exact match and preference accuracy must all favour the trained one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import output, run_skill
from skillbook.errors import ConfigError
from skillbook.ml import evaluate as ev

torch = pytest.importorskip("torch", reason="evaluation needs torch (the `train` extra)")

PEOPLE = ["Mira", "Tobin", "Lena", "Oskar", "Ada", "Bram", "Cora", "Dane", "Elsa", "Finn", "Greta", "Hugo"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black"]
OBJECTS = ["kite", "hat", "bike", "boat"]


def facts() -> list[tuple[str, str, str]]:
    """(person, object, colour) triples: a fixed little world the fixture model learns by heart."""
    return [
        (p, o, COLOURS[(i * 7 + j * 3) % len(COLOURS)]) for i, p in enumerate(PEOPLE) for j, o in enumerate(OBJECTS[:2])
    ]


def qa_rows() -> list[dict]:
    return [{"prompt": f"Question: What colour is {p}'s {o}?\nAnswer:", "completion": f" {c}"} for p, o, c in facts()]


TEMPLATES = ["{p}'s {o} is {c}.", "The {o} of {p} is {c}.", "{p} has a {c} {o}."]


def statements(held_out: bool) -> list[str]:
    """Every fact in two of three phrasings for training; the third phrasing of each fact is held out."""
    return [
        t.format(p=p, o=o, c=c)
        for i, (p, o, c) in enumerate(facts())
        for k, t in enumerate(TEMPLATES)
        if (k == i % len(TEMPLATES)) == held_out
    ]


def train_texts() -> list[str]:
    return statements(held_out=False) + [r["prompt"] + r["completion"] for r in qa_rows()]


def val_texts() -> list[str]:
    """Held-out phrasings of the trained facts (never trained on verbatim)."""
    return statements(held_out=True)


def make_tiny(out: Path, texts: list[str], steps: int) -> Path:
    """Train a byte-level BPE tokenizer + a tiny Llama on `texts` for `steps` (0 = the random init)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts * 4,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    if steps:
        enc = tok([t + tok.eos_token for t in texts], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        model.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: thread sync costs more than it saves, most of all on shared cores
        try:
            for _ in range(steps):
                loss = model(**enc, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        finally:
            torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def untrained_twin(model_dir: Path, out: Path) -> Path:
    """The random init of `model_dir`'s architecture, saved with the same tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A trained tiny model, its untrained init and the data dirs the recipe reads."""
    base = tmp_path_factory.mktemp("eval")
    trained = make_tiny(base / "trained", train_texts(), steps=150)
    write_jsonl(base / "corpus" / "val.jsonl", [{"text": t} for t in val_texts()])
    write_jsonl(base / "corpus" / "train.jsonl", [{"text": t} for t in train_texts()])
    write_jsonl(base / "questions" / "test.jsonl", [dict(r, kind="fact") for r in qa_rows()])
    wrong = [
        {
            "prompt": r["prompt"],
            "chosen": r["completion"],
            "rejected": " " + COLOURS[(COLOURS.index(r["completion"].strip()) + 1) % len(COLOURS)],
        }
        for r in qa_rows()
    ]
    write_jsonl(base / "prefs" / "test.jsonl", wrong)
    return {
        "trained": trained,
        "untrained": untrained_twin(trained, base / "untrained"),
        "base": base,
        "corpus": base / "corpus",
        "questions": base / "questions",
        "prefs": base / "prefs",
        "pairs": wrong,
    }


@pytest.fixture(scope="module")
def loaded(tiny) -> dict:
    return {name: ev.load_model_and_tokenizer(tiny[name]) for name in ("trained", "untrained")}


# ---------------------------------------------------------------------------------------------
# The metric library
# ---------------------------------------------------------------------------------------------


def test_perplexity_trained_below_untrained(loaded):
    trained = ev.perplexity(*loaded["trained"], val_texts())
    untrained = ev.perplexity(*loaded["untrained"], val_texts())
    vocab = len(loaded["untrained"][1])
    assert untrained > vocab * 0.5, "a random init should be about as unsure as a uniform guess over the vocabulary"
    assert trained < untrained / 3, (trained, untrained)


def test_perplexity_does_not_depend_on_batching(loaded):
    model, tok = loaded["trained"]
    one = ev.perplexity(model, tok, val_texts(), batch_size=1)
    many = ev.perplexity(model, tok, val_texts(), batch_size=7)
    short = ev.perplexity_stats(model, tok, val_texts(), max_length=8)  # windows: more tokens lose their context
    assert one == pytest.approx(many, rel=1e-4)
    assert short["n_tokens"] < ev.perplexity_stats(model, tok, val_texts())["n_tokens"]


def test_batched_left_padded_generation_equals_one_by_one(loaded):
    model, tok = loaded["trained"]
    prompts = [r["prompt"] for r in qa_rows()[:6]] + ["Mira's"]  # different lengths force padding
    batched = ev.generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=7)
    single = [ev.generate_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right", "generation must restore the tokenizer's padding side"


def test_sampling_is_seeded(loaded):
    model, tok = loaded["untrained"]
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
    a = ev.generate_answers(model, tok, ["Mira's kite"] * 3, seed=3, **kw)
    assert a == ev.generate_answers(model, tok, ["Mira's kite"] * 3, seed=3, **kw)
    assert len(set(a)) > 1, "sampling from a random init should not repeat itself"


def test_exact_match_rises_with_training(loaded):
    trained = ev.exact_match(*loaded["trained"], qa_rows())
    untrained = ev.exact_match(*loaded["untrained"], qa_rows())
    assert trained["n"] == untrained["n"] == len(qa_rows())
    assert trained["exact_match"] >= 0.9, trained["samples"]
    assert untrained["exact_match"] <= 0.2
    assert len(trained["samples"]) == 5 and set(trained["samples"][0]) >= {"prompt", "answer", "expected"}


def test_answer_normalisation():
    assert ev.answer_matches(" Red.\nQuestion: next", " red")
    assert ev.answer_matches("the red kite", "red kite")
    assert ev.answer_matches(" 17 apples", " 17")
    assert not ev.answer_matches(" reddish", " red")
    assert not ev.answer_matches("", " red")
    assert ev.answer_matches("\n blue\nred", " blue"), "the first non-empty line is the answer"
    assert not ev.answer_matches("\n blue\nred", " red"), "only the first non-empty line counts"


def test_preference_accuracy_prefers_trained_answers(loaded, tiny):
    trained = ev.preference_accuracy(*loaded["trained"], tiny["pairs"])
    swapped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in tiny["pairs"]]
    assert trained["preference_accuracy"] == 1.0 and trained["mean_margin"] > 1.0
    assert ev.preference_accuracy(*loaded["trained"], swapped)["preference_accuracy"] == 0.0
    assert trained["n"] == len(tiny["pairs"])


def test_completion_logprobs_score_only_the_completion(loaded):
    model, tok = loaded["trained"]
    full = ev.completion_logprobs(model, tok, ["Mira's kite is"], [" red."])[0]
    with torch.no_grad():  # the same number by hand: log-softmax of the logits at the completion positions
        p = tok("Mira's kite is")["input_ids"]
        c = tok(" red.", add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
        by_hand = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
    assert full == pytest.approx(by_hand, abs=1e-4)


def test_pairwise_counts():
    res = ev.pairwise([True, True, False, False], [True, False, True, False])
    assert (res["wins"], res["ties"], res["losses"], res["win_rate"]) == (1, 2, 1, 0.5)
    assert res["pvalue"] == 1.0
    assert ev.sign_test(10, 0) == pytest.approx(2 / 2**10)  # 10 wins, no losses: p ~ 0.002
    assert ev.sign_test(6, 4) > 0.5


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


def test_recipe_reports_every_key_and_compares(tiny, tmp_path):
    res = run_skill(
        "evaluation",
        tmp_path,
        {
            "model": str(tiny["trained"]),
            "compare_model": str(tiny["untrained"]),
            "corpus": str(tiny["corpus"]),
            "eval_data": str(tiny["questions"]),
            "preference_data": str(tiny["prefs"]),
            "num_samples": 2,
        },
    )
    report = json.loads(output(res, "report").read_text())
    assert set(report) == set(ev.EVAL_REPORT_KEYS)
    assert report["perplexity"] < report["compare_perplexity"]
    assert report["bits_per_byte"] == pytest.approx(
        report["val_loss"] * report["n_perplexity_tokens"] / 0.6931472 / sum(len(t.encode()) for t in val_texts()),
        rel=1e-6,
    )
    assert report["exact_match"] > report["compare_exact_match"]
    assert report["preference_accuracy"] == 1.0
    assert report["wins"] > report["losses"] and report["win_rate"] > 0.5 and report["win_pvalue"] < 0.01
    assert report["n_exact_match"] == len(qa_rows()) and report["exact_match_by_kind"]["fact"] == report["exact_match"]
    assert len(report["samples"]) == 2 and all(s["generation"] is not None for s in report["samples"])
    assert res["summary"]["perplexity"] == report["perplexity"] and res["summary"]["win_rate"] == report["win_rate"]
    md = (Path(res["run_dir"]) / "report.md").read_text()
    assert "| perplexity (lower is better) |" in md and "win rate" in md


def test_recipe_refuses_missing_model(tmp_path):
    with pytest.raises(ConfigError, match=r"model: .*does-not-exist does not exist"):
        run_skill("evaluation", tmp_path, {"model": str(tmp_path / "does-not-exist")})
    assert not (tmp_path / "evaluation").exists(), "nothing is written before the inputs are checked"


def test_recipe_refuses_data_dir_without_split(tiny, tmp_path):
    # a corpus folder's val.jsonl is a held-out split by name (data_files.HELD_OUT_NAMES), but not questions
    with pytest.raises(ConfigError, match=r"eval_data: .*val\.jsonl:1 has no 'prompt' column"):
        run_skill(
            "evaluation",
            tmp_path,
            {"model": str(tiny["trained"]), "corpus": str(tiny["corpus"]), "eval_data": str(tiny["corpus"])},
        )


def test_pretrained_model_beats_its_untrained_init(pretrained_model, prepared, tmp_path):
    """The pipeline's tiny pretrained model vs a random init of the same architecture, on the default held-out data."""
    from transformers import AutoTokenizer

    init = untrained_twin(pretrained_model, tmp_path / "init")
    res = run_skill(
        "evaluation",
        tmp_path,
        {
            "model": str(pretrained_model),
            "compare_model": str(init),
            "preference_data": str(output(prepared, "preference_data")),
            "num_samples": 1,
        },
    )
    report = json.loads(output(res, "report").read_text())
    vocab = len(AutoTokenizer.from_pretrained(pretrained_model))
    assert report["compare_perplexity"] > 0.3 * vocab, "a random init is about as unsure as a uniform guess"
    assert report["perplexity"] < report["compare_perplexity"] / 10, report
    # Exact match is not compared: the pretrained model has never seen the Question/Answer format (SFT teaches
    # it), so both score ~0 and a random init can luck into one answer.
    assert report["wins"] + report["ties"] + report["losses"] == report["n_exact_match"]
    assert report["n_exact_match"] > 50 and report["n_perplexity_docs"] > 50
    assert (Path(res["run_dir"]) / "data" / "eval").is_dir(), "default held-out data is written inside the run dir"


def test_gguf_file_evaluates_like_its_hf_model(tiny, loaded, tmp_path):
    """A Q8_0 GGUF export, dequantized by transformers, scores within 2% of the model it came from."""
    pytest.importorskip("gguf", reason="GGUF evaluation needs the gguf package (the `serve` extra)")
    from skillbook.ml import gguf_export

    path = tmp_path / "tiny-Q8_0.gguf"
    gguf_export.write_gguf(tiny["trained"], path, "Q8_0")
    model, tok = ev.load_model_and_tokenizer(path)  # the tokenizer is read from the GGUF file itself
    assert tok(val_texts()[0])["input_ids"] == loaded["trained"][1](val_texts()[0])["input_ids"]
    hf = ev.perplexity(*loaded["trained"], val_texts())
    assert ev.perplexity(model, tok, val_texts()) == pytest.approx(hf, rel=0.02)
    assert ev.exact_match(model, tok, qa_rows())["exact_match"] >= 0.9


def test_adapter_is_merged_into_the_same_numbers(tiny, loaded, tmp_path):
    """A PEFT adapter dir on top of the base scores exactly what the unmerged PeftModel scores."""
    from peft import LoraConfig, get_peft_model

    base, tok = ev.load_model_and_tokenizer(tiny["trained"])
    torch.manual_seed(0)
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )  # random B: the adapter changes the output
    lora.save_pretrained(tmp_path / "adapter")
    unmerged = ev.perplexity(lora, tok, val_texts())
    merged, _ = ev.load_model_and_tokenizer(tiny["trained"], adapter=tmp_path / "adapter")
    assert ev.perplexity(merged, tok, val_texts()) == pytest.approx(unmerged, rel=1e-4)
    assert unmerged != pytest.approx(ev.perplexity(*loaded["trained"], val_texts()), rel=1e-3)
