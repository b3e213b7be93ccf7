"""lm-evaluation-harness glue: a local generate_until task written at run time, the harness run, llama.cpp's own EM.

`write_task` turns held-out {prompt, completion} rows into a harness task folder (`<name>.yaml`, `<name>.jsonl`
and `<name>_utils.py`) that needs no hub: `dataset_path: json` on the local file, greedy `generate_until`
with the same token budget as the evaluation skill, and `process_results` scoring with
`skillbook.ml.evaluate.answer_matches`, so the harness' exact match and the evaluation skill's are one rule.
`simple_evaluate_local` loads that folder with `TaskManager(include_path=...)` and runs `lm_eval.simple_evaluate`.
`llama_cpp_exact_match` scores a GGUF with llama-cpp-python in-process: the reference for the served GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The utils module next to the YAML: lm-eval resolves `!function <module>.process_results` from the task dir.
_UTILS = '''"""process_results of the {name} task: the evaluation skill's exact-match rule (skillbook.ml.evaluate)."""

from skillbook.ml.evaluate import answer_matches


def process_results(doc, results):
    """1.0 when the first line of the generation starts with the expected answer's words (SQuAD-normalised)."""
    return {{"exact_match": float(answer_matches(results[0], doc["completion"]))}}
'''


def task_yaml(name: str, data_file: Path, max_gen_toks: int, cache_dir: Path) -> str:
    """The harness task config: local JSON rows, zero-shot prompt as-is, greedy generation, EM via process_results."""
    return "\n".join(
        [
            f"task: {name}",
            "dataset_path: json  # the datasets `json` builder on a local file: no hub",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_file))}",
            f"  cache_dir: {json.dumps(str(cache_dir))}  # datasets' Arrow cache stays in the run dir",
            "test_split: test",
            "output_type: generate_until",
            "doc_to_text: prompt  # a column name: the prompt verbatim (ends with 'Answer:')",
            "doc_to_target: completion",
            "num_fewshot: 0",
            "generation_kwargs:",
            "  until: []  # stop at EOS only (added by the harness), as the evaluation skill does",
            f"  max_gen_toks: {max_gen_toks}",
            "  do_sample: false",
            "  temperature: 0.0",
            f"process_results: !function {name}_utils.process_results",
            "metric_list:",
            "  - metric: exact_match",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )


def write_task(task_dir: Path, name: str, rows: list[dict], max_gen_toks: int) -> Path:
    """Write `<name>.yaml`, `<name>.jsonl` (the rows, in order) and `<name>_utils.py` into task_dir; return task_dir."""
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}, ensure_ascii=False) + "\n")
    (task_dir / f"{name}.yaml").write_text(task_yaml(name, data, max_gen_toks, task_dir.parent / "hf_datasets"))
    (task_dir / f"{name}_utils.py").write_text(_UTILS.format(name=name))
    return task_dir


def hf_lm(model_dir: str | Path, batch_size: int, device: str, dtype: str, tokenizer: str | Path | None = None) -> Any:
    """lm-eval's `hf` model (HFLM) on a local model dir, generating exactly `max_gen_toks` tokens.

    A generation_config.json with `max_new_tokens` (every save_pretrained of a tuned model may carry one) beats
    the `max_length` HFLM passes to generate, so the harness would silently generate that many tokens instead.
    """
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model_dir), tokenizer=str(tokenizer or model_dir), batch_size=batch_size,
              device=device, dtype=dtype)  # fmt: skip
    lm.model.generation_config.max_new_tokens = None
    return lm


def simple_evaluate_local(
    model: Any, model_args: dict[str, Any] | None, task_dir: Path, name: str, batch_size: int
) -> dict:
    """lm_eval.simple_evaluate on the local task (found through TaskManager(include_path=task_dir)), samples kept;
    `model` is a registered model name (with model_args) or an lm-eval LM object."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False: skip indexing the harness' thousands of built-in task YAMLs (seconds on a small CPU)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    if name not in manager.all_tasks:
        raise RuntimeError(f"lm-eval did not register task {name!r} from {task_dir}")
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[name],
        task_manager=manager,
        batch_size=batch_size,
        log_samples=True,
    )


def harness_generations(results: dict, name: str) -> list[str]:
    """The harness' filtered generation per row, in dataset order (from its logged samples)."""
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] for s in samples]


def llama_cpp_exact_match(gguf: Path, rows: list[dict], max_tokens: int, n_ctx: int = 0, threads: int = 1) -> dict:
    """Greedy answers from llama-cpp-python in-process (the engine the server wraps), scored by answer_matches."""
    from llama_cpp import Llama

    from skillbook.ml.evaluate import answer_matches

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    answers = []
    for r in rows:
        llm.reset()  # every prompt from an empty KV cache, as a fresh server request may not be
        out: Any = llm.create_completion(r["prompt"], max_tokens=max_tokens, temperature=0.0, seed=1234)
        answers.append(out["choices"][0]["text"])
    correct = [answer_matches(a, r["completion"]) for a, r in zip(answers, rows)]
    return {"exact_match": sum(correct) / max(len(rows), 1), "n": len(rows), "correct": correct, "answers": answers}


def render_report(r: dict, harness_table: str) -> str:
    """report.md of the benchmark-evaluation recipe: harness vs reference exact match, lm-eval's own table, answers."""
    lines = [f"# Benchmark of `{r['model']}` ({r['backend']} backend, lm-eval {r['harness_version']})", ""]
    lines += ["| measure | value |", "|---|---|", f"| harness exact match | {r['exact_match']:.4f} |"]
    if "reference_exact_match" in r:
        lines += [
            f"| reference exact match ({r['reference']}) | {r['reference_exact_match']:.4f} |",
            f"| difference | {r['exact_match_difference']:+.4f} |",
            f"| answers that differ | {r['answers_that_differ']} of {r['n']} |",
        ]
    if "evaluation_exact_match" in r:
        lines.append(f"| evaluation skill on the dequantized GGUF | {r['evaluation_exact_match']:.4f} |")
    lines += [f"| rows | {r['n']} ({r['data']}) |", f"| wall seconds | {r['seconds']} |", ""]
    lines += ["## lm-eval's table", "", harness_table.strip(), "", "## Answers", ""]
    lines += ["| prompt | answer | expected |", "|---|---|---|"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", "⏎ ").strip() or "(empty)"  # noqa: E731
    lines += [f"| {cell(s['prompt'])} | {cell(s['answer'])} | {cell(s['expected'])} |" for s in r["samples"]]
    return "\n".join(lines) + "\n"
