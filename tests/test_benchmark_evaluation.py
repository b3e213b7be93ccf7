"""benchmark-evaluation: lm-evaluation-harness on a local task agrees with the project's own scorers.

The hf backend's exact match must equal the evaluation skill's (its recipe run here on the same model and
rows); the served GGUF's must equal llama.cpp's in-process answers on the same file; bad input fails first.
"""

from __future__ import annotations

import json

import pytest

from conftest import output, run_skill
from families import FAMILIES
from skillbook.errors import ConfigError
from skillbook.ml import evaluate as ev
from skillbook.ml import harness


@pytest.fixture(scope="module")
def sft_gguf(sft_model, prepared, tmp_path_factory):
    """The session's SFT model as a Q8_0 GGUF (one llama.cpp converter run): it answers some questions right."""
    sets = {
        "model": str(sft_model),
        "corpus": str(output(prepared, "corpus")),
        "types": ["Q8_0"],
        "eval_docs": 4,
        "decode_tokens": 8,
        "torch_int8": False,
        "check_f32": False,
    }
    return output(run_skill("quantization", tmp_path_factory.mktemp("bench-gguf"), sets), "gguf")


def test_hf_harness_exact_match_equals_evaluation_skill(sft_model, tmp_path):
    bench_res = run_skill("benchmark-evaluation", tmp_path, {"model": str(sft_model)})
    bench = json.loads(output(bench_res, "report").read_text())
    # the evaluation skill's own recipe on the same model and its default held-out rows
    eval_res = run_skill("evaluation", tmp_path, {"model": str(sft_model), "num_samples": 0})
    evaluation = json.loads(output(eval_res, "report").read_text())
    assert bench["backend"] == "hf" and bench["lm_eval_model"] == "hf"
    assert bench["n"] == evaluation["n_exact_match"] == 222
    assert bench["exact_match"] == evaluation["exact_match"] > 0.1  # SFT answers some: equality is not 0 == 0
    assert bench["reference_exact_match"] == bench["exact_match"] and bench["answers_that_differ"] == 0
    # the harness' own results JSON and samples: its version, its metric, one sample per row, scored by our rule
    results = json.loads(output(bench_res, "results").read_text())
    assert results["results"]["skillbook_qa"]["exact_match,none"] == bench["exact_match"]
    assert results["n-samples"]["skillbook_qa"]["effective"] == 222
    run_dir = output(bench_res, "report").parent
    samples = [json.loads(x) for x in (run_dir / "lm_eval_samples_skillbook_qa.jsonl").open()]
    assert len(samples) == 222
    assert all(s["exact_match"] == ev.answer_matches(s["filtered_resps"][0], s["doc"]["completion"]) for s in samples)
    # the task lives in the run dir: the YAML points at the local JSONL (no hub), rows in the evaluation order
    tasks = output(bench_res, "tasks")
    yaml_text = (tasks / "skillbook_qa.yaml").read_text()
    assert "dataset_path: json" in yaml_text and str(tasks / "skillbook_qa.jsonl") in yaml_text
    assert "max_gen_toks: 8" in yaml_text and "output_type: generate_until" in yaml_text


def test_served_gguf_exact_match_equals_llama_cpp_in_process(sft_gguf, tmp_path):
    res = run_skill("benchmark-evaluation", tmp_path, {"model": str(sft_gguf)})
    bench = json.loads(output(res, "report").read_text())
    assert bench["backend"] == "gguf" and bench["lm_eval_model"] == "local-completions"
    assert bench["model_args"]["base_url"].endswith("/v1/completions") and not bench["via_gateway"]
    # scored again here, from the task's own JSONL, with llama-cpp-python in-process on the same file
    rows = [json.loads(x) for x in (output(res, "tasks") / "skillbook_qa.jsonl").open()]
    direct = harness.llama_cpp_exact_match(sft_gguf, rows, max_tokens=8, threads=1)
    assert bench["n"] == len(rows) == 222
    assert bench["exact_match"] == direct["exact_match"] > 0.1
    assert bench["answers_that_differ"] == 0


def test_gateway_in_front_of_llama_cpp_gives_the_same_answers(sft_gguf, tmp_path):
    res = run_skill("benchmark-evaluation", tmp_path, {"model": str(sft_gguf), "gateway": True, "limit": 24})
    bench = json.loads(output(res, "report").read_text())
    assert bench["via_gateway"] and bench["n"] == 24
    assert bench["exact_match"] == bench["reference_exact_match"] and bench["answers_that_differ"] == 0


def test_bad_inputs_fail_naming_the_field(sft_model, tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        run_skill("benchmark-evaluation", tmp_path, {"model": str(sft_model), "backend": "vllm"})
    with pytest.raises(ConfigError, match="model"):
        run_skill("benchmark-evaluation", tmp_path, {"model": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="model: backend gguf needs a .gguf file"):
        run_skill("benchmark-evaluation", tmp_path, {"model": str(sft_model), "backend": "gguf"})
    with pytest.raises(ConfigError, match="task_name"):
        run_skill("benchmark-evaluation", tmp_path, {"model": str(sft_model), "task_name": "Bad Name"})
    assert not (tmp_path / "benchmark-evaluation").exists()  # refused before a run dir was made


@pytest.mark.family_matrix("benchmark-evaluation")
@pytest.mark.parametrize("family", FAMILIES)
def test_benchmark_evaluation_on_family(family, family_model, tmp_path):
    """Every family's tiny random-init model: the harness scores the same answers the evaluation skill does."""
    res = run_skill("benchmark-evaluation", tmp_path, {"model": str(family_model(family)), "limit": 8})
    bench = json.loads(output(res, "report").read_text())
    assert bench["n"] == 8 and bench["answers_that_differ"] == 0
    assert bench["exact_match"] == bench["reference_exact_match"]
