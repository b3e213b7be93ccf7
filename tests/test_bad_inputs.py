"""The bad-input sweep, kept: every case is one `skills run ...` with one bad config value, skill name,
preset, config file, data file or model input.

For each, the CLI must exit non-zero with one message that names what to fix, print no traceback, write
nothing outside the runs dir, and leave either no run dir or one marked failed (error.txt, which
`skills runs gc` removes). Cases that the Config or the input check refuse never create a run dir at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from skillbook.cli import main

MODEL_SKILLS = [
    ("sft", "model"),
    ("dpo", "model"),
    ("grpo", "model"),
    ("reward-modeling", "model"),
    ("evaluation", "model"),
    ("export", "model"),
    ("quantization", "model"),
    ("serving", "model"),
    ("decoding", "model"),
    ("speculative-decoding", "model"),
    ("pruning", "model"),
    ("long-context", "model"),
    ("distillation", "teacher"),
]
# (name under the bad-files dir, what the message must say)
BAD_MODELS = [
    ("missing", r"does not exist"),
    ("empty-dir", r"no config\.json|has no config"),
    ("bad-header", r"not a readable safetensors file"),
    ("unknown-type", r"model_type"),
]
CORPUS_SKILLS = ["tokenization", "pretraining", "moe"]
BAD_CORPORA = [
    ("junk.txt", r"corpus: .*junk\.txt.*(UTF-8|utf-8|binary)"),
    ("notext.jsonl", r"corpus: .*notext\.jsonl.*text"),
    ("empty.txt", r"corpus: .*empty\.txt.*(empty|no text|no documents)"),
]

CASES: list[tuple[str, list[str], str]] = []
for skill, fld in MODEL_SKILLS:
    for name, pattern in BAD_MODELS:
        CASES.append((f"{skill}-{name}", [skill, "--set", f"{fld}={{bad}}/{name}"], rf"{fld}: .*{pattern}"))
for skill in CORPUS_SKILLS:
    for name, pattern in BAD_CORPORA:
        CASES.append((f"{skill}-{name}", [skill, "--set", f"corpus={{bad}}/{name}"], pattern))
CASES += [
    ("serving-junk-gguf", ["serving", "--set", "model={bad}/junk.gguf"], r"model: .*junk\.gguf.*GGUF"),
    ("quantization-junk-gguf", ["quantization", "--set", "model={bad}/junk.gguf"], r"model: "),
    (
        "sft-data-not-qa",
        ["sft", "--set", "model={bad}/good-model", "--set", "data={bad}/notext.jsonl"],
        r"data: .*notext\.jsonl.*(prompt|completion)",
    ),
    (
        "sft-data-bad-json",
        ["sft", "--set", "model={bad}/good-model", "--set", "data={bad}/bad.jsonl"],
        r"data: .*bad\.jsonl:1 is not valid JSON",
    ),
    (
        "dpo-data-not-pairs",
        ["dpo", "--set", "model={bad}/good-model", "--set", "data={bad}/qa.jsonl"],
        r"data: .*qa\.jsonl.*(chosen|rejected)",
    ),
    (
        "evaluation-eval-data-missing",
        ["evaluation", "--set", "model={bad}/good-model", "--set", "eval_data={bad}/nope.jsonl"],
        r"eval_data: .*does not",
    ),
    ("unknown-key", ["pretraining", "--set", "max_step=1"], r"max_step.*did you mean 'max_steps'"),
    ("sub-key-on-scalar", ["pretraining", "--set", "lr.x=1"], r"lr: Input should be a valid number"),
    ("wrong-type", ["pretraining", "--set", "max_steps=many"], r"max_steps"),
    ("negative", ["pretraining", "--set", "max_steps=-1"], r"max_steps"),
    ("out-of-range-fraction", ["distillation", "--set", "val_fraction=2"], r"val_fraction"),
    ("huge-vocab", ["tokenization", "--set", "vocab_size=1000000000"], r"vocab_size"),
    ("bad-enum", ["long-context", "--set", "methods=[rope]"], r"methods"),
    ("keep-not-measured", ["long-context", "--set", "methods=[none]"], r"keep"),
    ("bad-dtype", ["pruning", "--set", "dtype=fp8"], r"dtype"),
    ("unknown-skill", ["sfft"], r"no skill named 'sfft'.*did you mean 'sft'"),
    ("path-as-skill", ["../skills/sft"], r"'\.\./skills/sft' is not a skill name"),
    ("absolute-path-as-skill", ["/etc/passwd"], r"no skill named|pipeline"),
    ("unknown-preset", ["pretraining", "--preset", "nope"], r"preset.*nope"),
    ("missing-config-file", ["pretraining", "--config", "{bad}/nope.yaml"], r"nope\.yaml"),
    ("bad-yaml-config-file", ["pretraining", "--config", "{bad}/broken.yaml"], r"broken\.yaml"),
    ("config-file-not-a-mapping", ["pretraining", "--config", "{bad}/list.yaml"], r"list\.yaml"),
    ("nproc-zero", ["pretraining", "--launcher", "torchrun", "--nproc-per-node", "0"], r"nproc-per-node"),
    (
        "accelerate-config-missing",
        ["sft", "--launcher", "accelerate", "--accelerate-config", "{bad}/nope.yaml"],
        r"--accelerate-config .*nope\.yaml does not exist",
    ),
    (
        "accelerate-config-without-launcher",
        ["sft", "--accelerate-config", "{bad}/accelerate.yaml"],
        r"--accelerate-config .*add --launcher accelerate",
    ),
    (
        "accelerate-config-not-a-config",
        ["sft", "--launcher", "accelerate", "--accelerate-config", "{bad}/list.yaml"],
        r"list\.yaml is not an accelerate config",
    ),
    ("missing-pipeline-file", ["{bad}/nope.yaml"], r"nope\.yaml"),
    ("bad-pipeline-set", ["speedrun", "--dry-run", "--set", "nostep.x=1"], r"nostep"),
    ("quantization-bad-type", ["quantization", "--set", "types=[Q9_9]"], r"types"),
    ("serving-bad-port", ["serving", "--set", "port=99999"], r"port"),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """The bad files: junk bytes, wrong columns, empty files, broken model dirs, a junk .gguf, broken YAML."""
    d = tmp_path_factory.mktemp("bad-files")
    (d / "junk.txt").write_bytes(bytes(range(128, 256)) * 64)
    (d / "notext.jsonl").write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(20)))
    (d / "empty.txt").write_text("")
    (d / "bad.jsonl").write_text("{not json\n")
    (d / "qa.jsonl").write_text(json.dumps({"prompt": "Question: q?\nAnswer:", "completion": " a"}) + "\n")
    (d / "junk.gguf").write_bytes(b"this is not a gguf file at all")
    (d / "empty-dir").mkdir()
    llama = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1}
    (d / "bad-header").mkdir()
    (d / "bad-header" / "config.json").write_text(json.dumps(llama))
    (d / "bad-header" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{junk" + b"\0" * 32)
    (d / "unknown-type").mkdir()
    (d / "unknown-type" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    AutoModelForCausalLM.from_config(tiny).save_pretrained(d / "good-model")  # loads; carries no tokenizer
    (d / "broken.yaml").write_text("lr: [unclosed\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "accelerate.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    return d


@pytest.mark.parametrize(("case", "args", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message(case, args, pattern, bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SKILLBOOK_RUNS", str(tmp_path / "runs"))
    argv = ["run", *[a.replace("{bad}", str(bad)) for a in args], "--runs-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(main, argv)
    text = result.output  # stdout and stderr together
    assert result.exit_code != 0, f"silently accepted: {case}\n{text[-2000:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), f"traceback: {case}\n{text}"
    assert "Traceback" not in text, text
    assert len(text.strip().splitlines()) <= 12, f"not one message:\n{text}"
    import re

    assert re.search(pattern.replace("{bad}", str(bad)), text, re.S), f"{case}: {pattern!r} not in\n{text}"
    # nothing outside the runs dir; a run dir that exists is marked failed
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["runs"]), os.listdir(tmp_path)
    runs = tmp_path / "runs"
    for run_dir in runs.glob("*/*") if runs.is_dir() else []:
        if run_dir.parent.name not in ("cache", "pipelines"):
            assert (run_dir / "error.txt").exists(), f"{case}: unmarked run dir {run_dir}"


def test_the_sweep_has_at_least_sixty_cases():
    assert len(CASES) >= 60
