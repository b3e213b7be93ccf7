"""Serving: an OpenAI-compatible HTTP server for a GGUF file or an hf-model, and a client that checks it.

Backends: `llama-cpp` (a .gguf through llama-cpp-python, CPU), `transformers` (any hf-model, CPU
or GPU) — both behind Skillbook's FastAPI app (skillbook.ml.serve_app) under uvicorn — and `vllm`
(GPU), which runs vLLM's own OpenAI server (`vllm serve`). The server listens on host:port, the
recipe waits for GET /health, prints the URL, and serves until Ctrl-C or SIGTERM. With
`smoke=true` it starts, sends one completion, one chat and one streamed chat with the official
`openai` client (plus an optional load test), stops, and writes the results as the `report`.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from skillbook.errors import ConfigError
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"report": "report"}
INPUTS = {"model": "gguf|hf-model"}


class VLLMConfig(BaseModel):
    """The `vllm serve` flags that matter; see references/vllm.md."""

    model_config = ConfigDict(extra="forbid")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one model is sharded over (--tensor-parallel-size); must divide the head count."
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of each GPU vLLM may take for weights + KV cache (--gpu-memory-utilization).",
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description=(
            "Longest prompt + output (--max-model-len); lower it when the KV cache does not fit. None = the model's."
        ),
    )
    quantization: Literal["awq", "gptq", "fp8", "bitsandbytes"] | None = Field(
        None, description="Weight quantization of the checkpoint (--quantization); None = as stored."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Compute dtype (--dtype).")
    extra_args: list[str] = Field(
        default_factory=list,
        description="More `vllm serve` arguments, passed through verbatim (e.g. --enable-prefix-caching).",
    )


class Config(RecipeConfig):
    model: str = Field(
        ...,
        description=(
            "What to serve: a .gguf file (quantization output) or an hf-model directory (pretraining/sft/dpo output)."
        ),
    )
    backend: Literal["auto", "llama-cpp", "transformers", "vllm"] = Field(
        "auto", description="auto = llama-cpp for a .gguf file, transformers for a directory. vllm needs a CUDA GPU."
    )
    host: str = Field(
        "127.0.0.1",
        description="Interface to listen on. 127.0.0.1 = this machine only; 0.0.0.0 exposes it (set api_key then).",
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 = pick a free one.")
    model_id: str | None = Field(
        None, description="Model name clients send in `model`; None = the file or folder name."
    )
    api_key: str | None = Field(
        None,
        description="If set, /v1/* requires 'Authorization: Bearer <api_key>' (401 otherwise); /health stays open.",
    )
    smoke: bool = Field(
        False,
        description=(
            "Start, query (models, completion, chat, streamed chat), stop, write the report. "
            "Used by tests and pipelines."
        ),
    )
    prompt: str = Field(
        "Question: What colour is Mira's kite?\nAnswer:", description="Prompt the smoke and load tests send."
    )
    max_tokens: int = Field(16, ge=1, description="max_tokens of the smoke and load-test requests.")
    load_clients: int = Field(
        0, ge=0, le=256, description="With smoke=true: also run this many concurrent clients (0 = no load test)."
    )
    load_requests: int = Field(2, ge=1, description="Requests each load-test client sends, one after the other.")
    n_ctx: int = Field(0, ge=0, description="llama-cpp context window in tokens; 0 = the model's trained context.")
    threads: int = Field(
        1,
        ge=1,
        description=(
            "CPU threads for llama.cpp / torch (llama.cpp defaults to half the cores). 1 for tiny models, whose ops "
            "are too small to split; physical cores for real ones."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="transformers backend device; auto = cuda when available."
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Settings used only by backend=vllm.")
    startup_timeout: float = Field(
        180, gt=0, description="Seconds to wait for GET /health before giving up (vLLM loads + compiles for minutes)."
    )


# ---------------------------------------------------------------------------------------------
# Starting the server: in-process app (llama-cpp, transformers) or a `vllm serve` subprocess
# ---------------------------------------------------------------------------------------------


def pick_backend(cfg: Config, path: Path) -> str:
    """The backend for this model file, refusing combinations that cannot work."""
    is_gguf = path.is_file() and path.suffix == ".gguf"
    backend = cfg.backend if cfg.backend != "auto" else ("llama-cpp" if is_gguf else "transformers")
    if backend == "llama-cpp" and not is_gguf:
        raise ConfigError(
            f"model: backend llama-cpp serves a .gguf file, got {path}; "
            "run the quantization skill first or use backend=transformers"
        )
    if backend in ("transformers", "vllm") and not (path / "config.json").is_file():
        raise ConfigError(f"model: backend {backend} needs an hf-model directory with config.json, got {path}")
    if backend == "vllm":
        import shutil

        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "backend: vllm needs a CUDA GPU and none is visible; "
                "use backend=llama-cpp (GGUF) or transformers on CPU"
            )
        if shutil.which("vllm") is None:
            raise ConfigError(
                "backend: the `vllm` command is not installed; pip install 'skillbook[gpu]' (vllm) on the GPU machine"
            )
    return backend


class Served:
    """A running server: its URL and how to stop it."""

    def __init__(self, cfg: Config, path: Path, backend: str, port: int, ctx: RunContext):
        from skillbook.ml import serve_app, serve_backends

        self.url, self.proc, self.thread, self.engine = f"http://{cfg.host}:{port}", None, None, None
        model_id = cfg.model_id or (path.stem if path.is_file() else path.name)
        if backend == "vllm":
            import subprocess

            v = cfg.vllm
            argv = serve_backends.vllm_argv(
                str(path),
                port,
                cfg.host,
                v.tensor_parallel_size,
                v.gpu_memory_utilization,
                v.max_model_len,
                v.quantization,
                model_id,
                cfg.api_key,
                v.dtype,
                v.extra_args,
            )
            ctx.info("starting: " + " ".join(argv))
            self.proc = subprocess.Popen(argv, stdout=open(ctx.out_dir / "vllm.log", "w"), stderr=subprocess.STDOUT)
            try:
                serve_app.wait_healthy(self.url, cfg.startup_timeout, alive=lambda: self.proc.poll() is None)
            except BaseException:  # failed or interrupted start: never leave a GPU server behind
                self.stop()
                raise
            return
        if backend == "llama-cpp":
            self.engine = serve_backends.LlamaCppBackend(
                path, n_ctx=cfg.n_ctx, n_threads=cfg.threads, model_id=model_id
            )
        else:
            import torch

            torch.set_num_threads(cfg.threads)
            self.engine = serve_backends.TransformersBackend(path, device=cfg.device, model_id=model_id)
        self.thread = serve_app.ServerThread(serve_app.create_app(self.engine, cfg.api_key), cfg.host, port)
        try:
            self.thread.start(cfg.startup_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
        if self.engine is not None:
            self.engine.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # vLLM shuts down cleanly on SIGTERM
            try:
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a hung server is killed rather than left behind
                self.proc.kill()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so every `finally` below stops the server."""


def on_sigterm(signum, frame):
    raise Terminated()


def wait_for_signal() -> str:
    """Block until Ctrl-C or SIGTERM; return which one arrived."""
    try:
        while True:
            time.sleep(0.5)
    except Terminated:
        return "SIGTERM"
    except KeyboardInterrupt:
        return "SIGINT"


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    from skillbook.ml import serve_app, serve_clients

    path = artifact_path(cfg.model, "model")
    backend = pick_backend(cfg, path)
    port = cfg.port or serve_app.free_port()
    # SIGTERM (systemd, Kubernetes, `kill`) from here on behaves like Ctrl-C: no window where it kills us uncleanly
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    t0, served = time.perf_counter(), None
    report: dict = {"backend": backend, "model": str(path), "url": f"http://{cfg.host}:{port}"}
    try:
        served = Served(cfg, path, backend, port, ctx)
        report["startup_s"] = time.perf_counter() - t0
        ctx.info(f"{backend} server for {path.name} ready in {report['startup_s']:.1f} s")
        if cfg.smoke:
            # ---- smoke: the official client, the same calls an application makes -------------
            report["smoke"] = serve_clients.smoke_test(served.url, cfg.prompt, cfg.max_tokens, cfg.api_key)
            ctx.info(
                f"smoke: completion {report['smoke']['completion']['text']!r}, chat {report['smoke']['chat']['text']!r}"
            )
            if cfg.load_clients:
                report["load"] = serve_clients.load_test(
                    served.url, cfg.load_clients, cfg.load_requests, cfg.max_tokens, cfg.prompt, cfg.api_key
                )
                ctx.info("load: " + json.dumps({k: v for k, v in report["load"].items() if k != "errors"}))
        else:
            # ---- serve until told to stop ----------------------------------------------------
            print(
                f"serving {path.name} ({backend}) at {served.url}/v1 — Ctrl-C or SIGTERM to stop",
                file=sys.stderr,
                flush=True,
            )
            report["stopped_by"] = wait_for_signal()
    except KeyboardInterrupt as exc:
        if cfg.smoke:
            raise  # an interrupted smoke test has no report to write
        report["stopped_by"] = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
    finally:
        if served is not None:
            served.stop()
            ctx.info("server stopped")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    out = ctx.out_dir / "serving.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if "smoke" in report:
        s = report["smoke"]
        ctx.summary.update(
            smoke_ok=s["ok"],
            completion_latency_s=round(s["completion"]["latency_s"], 3),
            chat_latency_s=round(s["chat"]["latency_s"], 3),
            stream_ttft_s=round(s["stream"]["ttft_s"] or 0, 3),
        )
    if "load" in report:
        ld = report["load"]
        ctx.summary.update(
            load_clients=ld["clients"],
            load_failed=ld["failed"],
            latency_p50_s=round(ld["latency_p50_s"] or 0, 3),
            latency_p95_s=round(ld["latency_p95_s"] or 0, 3),
            requests_per_s=round(ld["requests_per_s"], 2),
            generated_tokens_per_s=round(ld["generated_tokens_per_s"], 1),
        )
    ctx.summary["startup_s"] = round(report.get("startup_s", 0.0), 2)
    return {"report": out}
