"""Benchmark evaluation with lm-evaluation-harness, offline: a local task on an hf-model dir or a served GGUF.

Writes the held-out {prompt, completion} rows as a harness task (`tasks/<task>.yaml` + `.jsonl`, no hub), runs
`lm_eval.simple_evaluate` with the `hf` model on a model dir or with `local-completions` against llama.cpp's
OpenAI-compatible server on a .gguf file, and scores the same rows once more outside the harness (the evaluation
skill's `exact_match` for a model dir, llama-cpp-python in-process for a GGUF), so the two numbers check each
other. Outputs: benchmark.json, the harness' own results JSON and samples, report.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from skillbook.errors import ConfigError
from skillbook.ml.data_files import EvalDataPath
from skillbook.run.recipe import HUB_ID_RE, RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"report": "report", "results": "file", "tasks": "dir"}
INPUTS = {"model": "hf-model|gguf", "tokenizer": "tokenizer", "eval_data": "sft-data"}


class Config(RecipeConfig):
    # ---- what to evaluate
    model: str = Field(
        ..., description="An hf-model dir (save_pretrained, tokenizer inside) or a .gguf file (served by llama.cpp)."
    )
    backend: Literal["auto", "hf", "gguf"] = Field(
        "auto",
        description=(
            "hf: lm-eval's `hf` model loads the dir; gguf: llama_cpp.server serves the file and lm-eval's "
            "`local-completions` model calls it; auto: gguf for a .gguf file, else hf."
        ),
    )
    tokenizer: str | None = Field(
        None,
        description=(
            "Tokenizer dir: hf backend, instead of the model dir's own; gguf backend, also score the GGUF with the "
            "evaluation skill (dequantized by transformers) using it."
        ),
    )
    # ---- on what
    eval_data: EvalDataPath | None = Field(
        None,
        description=(
            "Held-out {prompt, completion} rows: a .jsonl/.json/.parquet file or a folder (test.jsonl); None = the "
            "embedded held-out set the evaluation skill scores by default."
        ),
    )
    limit: int = Field(500, ge=1, description="The first N rows are scored (the evaluation skill's max_examples).")
    task_name: str = Field(
        "skillbook_qa", pattern=r"^[a-z][a-z0-9_]{0,63}$", description="Name of the local harness task."
    )
    # ---- how
    max_gen_toks: int = Field(8, ge=1, description="Greedy tokens per answer (the evaluation skill's max_new_tokens).")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call (hf) or per request (gguf: 1 is safest).")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="hf backend: auto = cuda if present.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="hf backend weights; auto = float32 on cpu, bfloat16 on cuda (as the evaluation skill)."
    )
    threads: int = Field(
        1, ge=1, description="gguf backend: llama.cpp threads (server and reference); more only on idle cores."
    )
    n_ctx: int = Field(0, ge=0, description="gguf backend: llama.cpp context size (0 = the model's).")
    gateway: bool = Field(
        False,
        description=(
            "gguf backend: send the harness' requests through skillbook's gateway in front of llama.cpp "
            "(it forwards the echo + logprobs that loglikelihood tasks send)."
        ),
    )
    startup_timeout: float = Field(120.0, gt=0, description="Seconds to wait for the llama.cpp server.")
    reference: bool = Field(True, description="Also score the rows outside the harness and record the difference.")

    @model_validator(mode="after")
    def _backend_fits_model(self) -> Config:
        """A backend that cannot load the given file fails in the Config, before a run dir exists."""
        path = Path(self.model).expanduser()
        if "${" not in self.model and path.exists():
            gguf = path.is_file() and path.suffix == ".gguf"
            if self.backend == "gguf" and not gguf:
                raise ValueError(f"model: backend gguf needs a .gguf file, got {path}")
            if self.backend == "hf" and gguf:
                raise ValueError(f"model: backend hf needs an hf-model dir, got the GGUF file {path}; use backend gguf")
        return self


def pick_backend(cfg: Config) -> tuple[str, str]:
    """(backend, model path or hub id): hf for a model dir or an online hub id, gguf for a .gguf file; a
    mismatch or a missing path fails here, before anything loads."""
    path = Path(cfg.model).expanduser()
    online = os.environ.get("HF_HUB_OFFLINE") != "1"
    if not path.exists() and online and HUB_ID_RE.match(cfg.model) and not cfg.model.startswith((".", "/", "~")):
        if cfg.backend == "gguf":
            raise ConfigError(f"model: backend gguf needs a local .gguf file, got the hub id {cfg.model}")
        return "hf", cfg.model  # lm-eval's hf model downloads it (online only)
    path = artifact_path(cfg.model, "model")
    gguf = path.is_file() and path.suffix == ".gguf"
    backend = cfg.backend if cfg.backend != "auto" else ("gguf" if gguf else "hf")
    if backend == "hf" and not (path / "config.json").is_file():  # Config already refused a .gguf for hf
        raise ConfigError(f"model: backend hf needs an hf-model dir with config.json, got {path}")
    return backend, str(path)


def held_out_rows(cfg: Config, ctx: RunContext) -> tuple[list[dict], str]:
    """The rows the evaluation skill scores with the same eval_data and max_examples: the first `limit`."""
    from skillbook.ml.data_files import load_held_out

    ref = cfg.eval_data
    if ref is None:
        from skillbook.ml.synthetic import write_default_data

        ref = str(write_default_data(ctx.out_dir / "data", seed=0)["eval_data"])
    q = load_held_out(ref, "eval_data", ("prompt", "completion"))
    source = q.held_source if cfg.eval_data else "the embedded synthetic held-out set"
    return q.held[: cfg.limit], source


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    t_start = time.time()
    # ---- inputs: every check before anything heavy loads -----------------------------------------
    backend, model = pick_backend(cfg)
    if cfg.tokenizer:
        artifact_path(cfg.tokenizer, "tokenizer")
    if not ctx.is_main:
        return {}
    rows, source = held_out_rows(cfg, ctx)
    ctx.info(f"eval_data: {len(rows):,} rows of {source}; backend {backend}")

    import lm_eval

    from skillbook.ml import harness

    # ---- the task: YAML + JSONL in the run dir, found by TaskManager(include_path=...) ----------
    tasks = harness.write_task(ctx.out_dir / "tasks", cfg.task_name, rows, cfg.max_gen_toks)
    ctx.progress(2 if cfg.reference else 1, "benchmarking")
    out: dict = {"backend": backend, "model": model, "harness": "lm_eval", "harness_version": lm_eval.__version__}
    out.update(task=cfg.task_name, task_yaml=str(tasks / f"{cfg.task_name}.yaml"), n=len(rows), data=source)

    # ---- the harness run -------------------------------------------------------------------------
    t0 = time.time()
    device = "cpu"
    if backend == "hf":
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        dtype = cfg.dtype if cfg.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
        lm = harness.hf_lm(model, cfg.batch_size, device, dtype, cfg.tokenizer)
        out.update(lm_eval_model="hf", model_args={"pretrained": model, "device": device, "dtype": dtype})
        results = harness.simple_evaluate_local(lm, None, tasks, cfg.task_name, cfg.batch_size)
    else:
        results, served = serve_and_evaluate(cfg, Path(model), tasks, ctx)
        out.update(served)
    out["harness_s"] = round(time.time() - t0, 2)
    metrics = results["results"][cfg.task_name]
    em, stderr = metrics["exact_match,none"], metrics.get("exact_match_stderr,none")
    out["tasks"] = {cfg.task_name: {"exact_match": em, "exact_match_stderr": stderr, "n": len(rows)}}
    out["exact_match"] = em
    ctx.info(f"lm-eval {lm_eval.__version__}: exact_match {em:.4f} on {len(rows)} rows in {out['harness_s']} s")
    ctx.log(step=1, harness_exact_match=em, seconds=out["harness_s"])
    gens = harness.harness_generations(results, cfg.task_name)

    # ---- the same rows outside the harness ---------------------------------------------------------
    if cfg.reference:
        t0 = time.time()
        out.update(score_outside(cfg, backend, model, rows, gens, device))
        out["exact_match_difference"] = em - out["reference_exact_match"]
        if "evaluation_exact_match" in out:
            out["evaluation_difference"] = em - out["evaluation_exact_match"]
        out["reference_s"] = round(time.time() - t0, 2)
        ctx.info(
            f"reference ({out['reference']}): exact_match {out['reference_exact_match']:.4f}; difference "
            f"{out['exact_match_difference']:+.4f}, {out['answers_that_differ']} of {len(rows)} answers differ"
        )
        ctx.log(step=2, reference_exact_match=out["reference_exact_match"], seconds=out["reference_s"])
    out["samples"] = [{"prompt": r["prompt"], "answer": g, "expected": r["completion"]} for r, g in zip(rows, gens)][:5]
    out["seconds"] = round(time.time() - t_start, 2)

    # ---- outputs: the harness' own results, benchmark.json, report.md ---------------------------
    from lm_eval.utils import handle_non_serializable, make_table

    samples = results.pop("samples")
    res_file = ctx.out_dir / "lm_eval_results.json"
    res_file.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    with open(ctx.out_dir / f"lm_eval_samples_{cfg.task_name}.jsonl", "w") as fh:
        for s in samples[cfg.task_name]:
            fh.write(json.dumps(s, default=handle_non_serializable) + "\n")
    bench = ctx.out_dir / "benchmark.json"
    bench.write_text(json.dumps(out, indent=2) + "\n")
    keys = ("exact_match", "reference_exact_match", "exact_match_difference", "answers_that_differ",
            "evaluation_exact_match", "n", "seconds")  # fmt: skip
    ctx.summary.update({k: out[k] for k in keys if k in out})
    ctx.report(harness.render_report(out, make_table(results)))
    return {"report": bench, "results": res_file, "tasks": tasks}


def score_outside(cfg: Config, backend: str, model: str, rows: list[dict], gens: list[str], device: str) -> dict:
    """The rows scored without the harness: the evaluation skill's exact_match on a model dir; llama.cpp in-process
    on a GGUF (the engine the server runs), plus the evaluation skill's dequantized GGUF when `tokenizer` is set."""
    from skillbook.ml import evaluate as ev
    from skillbook.ml import harness

    out: dict = {}
    if backend == "hf":
        hf_model, tok = ev.load_model_and_tokenizer(model, device=device, tokenizer=cfg.tokenizer)
        ref = ev.exact_match(hf_model, tok, rows, cfg.max_gen_toks, cfg.batch_size)
        out["reference"] = "skillbook.ml.evaluate.exact_match (the evaluation skill)"
    else:
        ref = harness.llama_cpp_exact_match(Path(model), rows, cfg.max_gen_toks, cfg.n_ctx, cfg.threads)
        out["reference"] = "llama-cpp-python in-process (skillbook.ml.harness.llama_cpp_exact_match)"
        if cfg.tokenizer:  # torch kernels on the dequantized weights: close to, not equal to, llama.cpp's
            hf_model, tok = ev.load_model_and_tokenizer(model, tokenizer=cfg.tokenizer)
            out["evaluation_exact_match"] = ev.exact_match(hf_model, tok, rows, cfg.max_gen_toks)["exact_match"]
    out["reference_exact_match"] = ref["exact_match"]
    out["answers_that_differ"] = sum(a != b for a, b in zip(gens, ref["answers"]))
    return out


def serve_and_evaluate(cfg: Config, gguf: Path, tasks: Path, ctx: RunContext) -> tuple[dict, dict]:
    """Start llama_cpp.server on the GGUF (optionally the gateway in front), run local-completions, stop both."""
    from skillbook.ml import harness, serve_procs

    port = serve_procs.free_port()
    argv = serve_procs.llama_cpp_argv(gguf, port, model_id=gguf.stem, n_ctx=cfg.n_ctx, threads=cfg.threads)
    server = serve_procs.ServerProcess(argv, f"http://127.0.0.1:{port}", gguf.stem, ctx.out_dir / "server.log")
    gateway = None
    try:
        served = {"server_startup_s": round(server.start(cfg.startup_timeout), 2), "server_command": argv}
        url = server.url
        if cfg.gateway:
            gateway = serve_procs.start_gateway(server, gguf, serve_procs.free_port(), ctx.out_dir / "gateway.log")
            url = gateway.url
        # tokenizer_backend None: prompts go out as text and the server tokenizes them exactly as in-process
        # llama.cpp does; a loglikelihood task would need a tokenizer and a server with echo + logprobs.
        args = {"model": gguf.stem, "base_url": f"{url}/v1/completions", "tokenizer_backend": None,
                "tokenized_requests": False, "num_concurrent": 1, "max_retries": 1}  # fmt: skip
        served.update(lm_eval_model="local-completions", model_args=args, via_gateway=cfg.gateway)
        ctx.info(f"llama.cpp server ready in {served['server_startup_s']} s; lm-eval calls {args['base_url']}")
        return harness.simple_evaluate_local("local-completions", args, tasks, cfg.task_name, 1), served
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
