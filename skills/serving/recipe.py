"""Serving: a maintained OpenAI-compatible server for a GGUF file or an hf-model, behind the gateway.

Every backend is its project's own server, started as a subprocess on a free loopback port: `llama-cpp` runs
llama-cpp-python's `python -m llama_cpp.server` on a .gguf (CPU), `transformers` runs `transformers serve`
on an hf-model directory with continuous batching (CPU or GPU), `vllm` runs `vllm serve` (GPU). In front of
it, on host:port, the gateway (skillbook.ml.gateway) validates requests, holds the API key, bounds
concurrency, queue and time, and answers every error in OpenAI's shape. The recipe refuses a port that is
taken, waits until both list the model id, prints the URL and serves until Ctrl-C or SIGTERM, then stops
both (SIGTERM, SIGKILL after 5 s). With `smoke=true` it sends one completion, one chat and one streamed chat
with the official `openai` client (plus an optional concurrent load test) and stops. `serving.json` records
backend, both command lines, startup seconds and the client results; the logs are `server.log` and
`gateway.log`.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from skillbook.errors import ConfigError
from skillbook.ml.model_files import check_model_path
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"report": "report"}
INPUTS = {"model": "gguf|hf-model"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class TransformersServeConfig(BaseModel):
    """The `transformers serve` flags that matter; see references/backends.md."""

    model_config = ConfigDict(extra="forbid")
    continuous_batching: bool = Field(
        True,
        description=(
            "Batch concurrent requests token by token (paged KV cache). transformers 5.x then takes temperature/"
            "top_p from the first request for all (the recipe's warm-up is greedy); false = per-request sampling, "
            "one request at a time."
        ),
    )
    kv_blocks: int | None = Field(
        None, ge=1, description="KV-cache blocks of 256 tokens (--cb-num-blocks). None = 16 on CPU, from GPU memory."
    )
    max_batch_tokens: int | None = Field(
        None, ge=16, description="Tokens per forward pass (--cb-max-batch-tokens). None = 256 on CPU, from GPU memory."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="--dtype; auto = as stored.")


class VLLMConfig(BaseModel):
    """The `vllm serve` flags that matter; see references/vllm.md."""

    model_config = ConfigDict(extra="forbid")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one model is sharded over (--tensor-parallel-size); must divide the head count."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of each GPU vLLM may take for weights + KV cache."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt + output (--max-model-len); lower it when the KV cache does not fit."
    )
    quantization: Literal["awq", "gptq", "fp8", "bitsandbytes"] | None = Field(
        None, description="Weight quantization of the checkpoint (--quantization); None = as stored."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Compute dtype (--dtype).")
    extra_args: list[str] = Field(
        default_factory=list, description="More `vllm serve` arguments, verbatim (e.g. --enable-prefix-caching)."
    )


class Config(RecipeConfig):
    model: str = Field(..., description="What to serve: a .gguf file or an hf-model directory (with config.json).")
    backend: Literal["auto", "llama-cpp", "transformers", "vllm"] = Field(
        "auto", description="auto = llama-cpp for a .gguf file, transformers for a directory. vllm needs a CUDA GPU."
    )
    host: str = Field(
        "127.0.0.1", description="Interface to listen on. 127.0.0.1 = this machine only; another needs api_key."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 = pick a free one. A taken port is refused.")
    model_id: str | None = Field(None, description="Model name clients send in `model`; None = the file/folder name.")
    api_key: str | None = Field(
        None, description="Bearer token the gateway requires on /v1 (any backend; llama-cpp and vllm check it too)."
    )
    insecure: bool = Field(False, description="Allow a non-loopback host without api_key (behind your own proxy).")
    smoke: bool = Field(False, description="Start, query (models, completion, chat, stream), stop, write the report.")
    prompt: str = Field("Question: What colour is Mira's kite?\nAnswer:", description="Prompt of smoke and load tests.")
    max_tokens: int = Field(16, ge=1, description="max_tokens of the smoke and load-test requests.")
    load_clients: int = Field(0, ge=0, le=256, description="With smoke=true: this many concurrent clients too.")
    load_requests: int = Field(2, ge=1, description="Requests each load-test client sends, one after the other.")
    n_ctx: int = Field(0, ge=0, description="llama-cpp context window in tokens; 0 = the model's trained context.")
    threads: int = Field(1, ge=1, description="CPU threads of the server (llama.cpp n_threads, torch threads).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="transformers device; auto = cuda if present.")
    transformers: TransformersServeConfig = Field(
        default_factory=TransformersServeConfig, description="backend=transformers."
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Settings used only by backend=vllm.")
    startup_timeout: float = Field(180, gt=0, description="Seconds to wait for the server to list the model.")
    request_timeout: float = Field(300, gt=0, description="Gateway: seconds to an answer (queue included), then 504.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Gateway: requests in flight upstream. None = 1 for llama-cpp (one at a time behind "
        "its lock), 16 for transformers with continuous batching (else 1), 64 for vllm.",
    )  # fmt: skip
    max_queue: int = Field(64, ge=0, description="Gateway: requests waiting for a slot; one more gets 429.")
    guard: str | None = Field(
        None,
        description="A safety classifier dir (the guardrails skill's `guard` output): the gateway refuses the "
        "requests it flags before they reach the backend. None = no guard.",
    )

    @model_validator(mode="after")
    def _exposure(self) -> Config:
        if self.host not in LOOPBACK and not self.api_key and not self.insecure:
            raise ValueError(
                f"host: {self.host} exposes the server beyond this machine without an api_key; set api_key, "
                "or insecure=true behind your own authenticating proxy"
            )
        if self.model_id is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.model_id):
            raise ValueError(f"model_id: {self.model_id!r} must be a plain name (letters, digits, . _ -)")
        return self


def pick_backend(cfg: Config, path: Path) -> str:
    """The backend for this model file, refusing combinations that cannot work."""
    is_gguf = path.is_file() and path.suffix == ".gguf"
    backend = cfg.backend if cfg.backend != "auto" else ("llama-cpp" if is_gguf else "transformers")
    if backend == "llama-cpp" and not is_gguf:
        raise ConfigError(f"model: backend llama-cpp serves a .gguf file, got {path}; run quantization first")
    check_model_path(path)
    if backend in ("transformers", "vllm") and not (path / "config.json").is_file():
        raise ConfigError(f"model: backend {backend} needs an hf-model directory with config.json, got {path}")
    if backend == "vllm":
        import shutil

        import torch

        if not torch.cuda.is_available():
            raise ConfigError("backend: vllm needs a CUDA GPU and none is visible; use llama-cpp or transformers")
        if shutil.which("vllm") is None:
            raise ConfigError("backend: the `vllm` command is not installed; pip install 'skillbook[gpu]'")
    return backend


def server_for(cfg: Config, path: Path, backend: str, port: int, ctx: RunContext):
    """The ServerProcess for this backend, plus the cwd and environment it runs with."""
    from skillbook.ml import serve_procs

    model_id = cfg.model_id or (path.stem if path.is_file() else path.name)
    host = "127.0.0.1"  # the backend listens on loopback only: the gateway is the way in
    url, cwd, env = f"http://{host}:{port}", None, {}
    if backend == "llama-cpp":
        argv = serve_procs.llama_cpp_argv(path, port, host, model_id, cfg.n_ctx, cfg.threads, cfg.api_key)
    elif backend == "transformers":
        # transformers serve names the model by the path it loads, so it loads ./<model_id> from the run dir
        cwd = ctx.out_dir / "models"
        cwd.mkdir(exist_ok=True)
        serve_procs.transformers_model_dir(path, cwd, model_id)
        # no torch import here (seconds): an NVIDIA device node says whether `auto` will find a GPU
        t, cpu = cfg.transformers, cfg.device == "cpu" or (cfg.device == "auto" and not Path("/dev/nvidiactl").exists())
        blocks, batch = (t.kv_blocks or 16, t.max_batch_tokens or 256) if cpu else (t.kv_blocks, t.max_batch_tokens)
        argv = serve_procs.transformers_argv(
            model_id, port, host, cfg.device, t.dtype, t.continuous_batching, blocks, batch
        )
        env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(cfg.threads)}
    else:
        v = cfg.vllm
        argv = serve_procs.vllm_argv(
            str(path), port, host, v.tensor_parallel_size, v.gpu_memory_utilization, v.max_model_len,
            v.quantization, model_id, cfg.api_key, v.dtype, v.extra_args,
        )  # fmt: skip
    server = serve_procs.ServerProcess(argv, url, model_id, ctx.out_dir / "server.log", cfg.api_key)
    return server, cwd, env


def check_guard(ref: str) -> Path:
    """The guard classifier dir, refused before any server starts unless it is a sequence classifier."""
    path = artifact_path(ref, "guard")
    cfg_file = path / "config.json"
    archs = json.loads(cfg_file.read_text()).get("architectures") or [] if cfg_file.is_file() else []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(
            f"guard: {path} is not a sequence-classification model dir (config.json architectures {archs}); "
            "pass the `guard` output of `skills run guardrails`"
        )
    return path


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    from skillbook.ml import serve_clients, serve_procs

    path = artifact_path(cfg.model, "model")
    backend = pick_backend(cfg, path)
    port = cfg.port or serve_procs.free_port(cfg.host if cfg.host != "localhost" else "127.0.0.1")
    if serve_procs.port_in_use(cfg.host, port):
        raise ConfigError(f"port: {cfg.host}:{port} is already in use by another process; pick another or port=0")
    guard = check_guard(cfg.guard) if cfg.guard else None
    # the backend listens on a free loopback port; the gateway takes host:port in front of it
    server, cwd, env = server_for(cfg, path, backend, serve_procs.free_port(), ctx)
    one_at_a_time = backend == "llama-cpp" or (backend == "transformers" and not cfg.transformers.continuous_batching)
    concurrent = cfg.max_concurrent or (1 if one_at_a_time else 16 if backend == "transformers" else 64)
    gw: dict[str, Any] = dict(host=cfg.host, n_ctx=cfg.n_ctx, max_queue=cfg.max_queue, max_concurrent=concurrent,
                              request_timeout=cfg.request_timeout, guard=guard)  # fmt: skip
    report: dict = {"backend": backend, "model": str(path), "model_id": server.model_id, "backend_url": server.url}
    report["command"] = server.argv if not cfg.api_key else [a if a != cfg.api_key else "***" for a in server.argv]
    report["gateway_command"] = serve_procs.gateway_argv(server.url, server.model_id, path, port, **gw)  # no key
    ctx.info("starting: " + " ".join(report["command"]))
    # SIGTERM (systemd, Kubernetes, `kill`) from here on behaves like Ctrl-C: every path stops the server
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, serve_procs.on_sigterm) if main else None
    interrupted: BaseException | None = None
    gateway = None
    try:
        report["startup_s"] = server.start(cfg.startup_timeout, cwd=cwd, env=env)
        if backend == "transformers":  # the first request sets up continuous batching: pay it here, greedy
            report["startup_s"] += serve_clients.warm_up(server.url, server.model_id)
        t = time.perf_counter()
        gateway = serve_procs.start_gateway(server, path, port, ctx.out_dir / "gateway.log", cfg.api_key, **gw)
        report.update(url=gateway.url, gateway_startup_s=time.perf_counter() - t)
        url, report["guard"] = gateway.url, {"guard": str(guard), "backend_url": server.url} if guard else None
        ctx.info(f"{backend} server for {path.name} ready in {report['startup_s']:.1f} s ({server.log.name}), "
                 f"gateway at {url} in {report['gateway_startup_s']:.1f} s")  # fmt: skip
        if cfg.smoke:
            # ---- smoke: the official client, the same calls an application makes -------------
            report["smoke"] = serve_clients.smoke_test(url, cfg.prompt, cfg.max_tokens, cfg.api_key)
            if guard:  # a disallowed request must come back as the refusal on every endpoint
                from skillbook.ml.guard_proxy import probe

                report["guard"]["probe"] = probe(url, cfg.api_key)
            s = report["smoke"]
            ctx.info(f"smoke: completion {s['completion']['text']!r}, chat {s['chat']['text']!r}")
            # what the gateway hop costs: medians of direct vs fronted completions, interleaved
            report["hop"] = serve_clients.hop_cost(server.url, url, server.model_id, cfg.api_key)
            ctx.info("gateway hop: " + json.dumps({k: round(v, 2) for k, v in report["hop"].items()}))
            if cfg.load_clients:
                report["load"] = serve_clients.load_test(
                    url, cfg.load_clients, cfg.load_requests, cfg.max_tokens, cfg.prompt, cfg.api_key
                )
                ctx.info("load: " + json.dumps({k: v for k, v in report["load"].items() if k != "errors"}))
        else:
            # ---- serve until told to stop ----------------------------------------------------
            print(f"serving {server.model_id} ({backend}) at {url}/v1 — Ctrl-C or SIGTERM to stop",
                  file=sys.stderr, flush=True)  # fmt: skip
            report["stopped_by"] = serve_procs.wait_for_signal(server, gateway)
            if report["stopped_by"] == "server exited":
                dead = server if not server.alive() else gateway
                interrupted = RuntimeError(f"the server exited on its own; {dead.log}:\n{dead.log_tail()}")
    except KeyboardInterrupt as exc:
        report["stopped_by"] = "SIGTERM" if isinstance(exc, serve_procs.Terminated) else "SIGINT"
        interrupted = exc if cfg.smoke else None  # an interrupted smoke test still fails, after the report
    finally:
        if gateway is not None:
            report["gateway_stop_s"] = gateway.stop()
        report["stop_s"] = server.stop()
        ctx.info(f"server stopped in {report['stop_s']:.1f} s")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        out = ctx.out_dir / "serving.json"
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if interrupted is not None:
        raise interrupted
    summarize(report, ctx)
    return {"report": out}


def summarize(report: dict, ctx: RunContext) -> None:
    if "smoke" in report:
        s = report["smoke"]
        ctx.summary.update(
            smoke_ok=s["ok"],
            completion_latency_s=round(s["completion"]["latency_s"], 3),
            chat_latency_s=round(s["chat"]["latency_s"], 3),
            stream_ttft_s=round(s["stream"]["ttft_s"] or 0, 3),
        )
    if "hop" in report:
        hop = report["hop"]
        ctx.summary.update(
            gateway_startup_s=round(report["gateway_startup_s"], 2),
            direct_median_ms=round(hop["direct_ms"], 1),
            gateway_median_ms=round(hop["gateway_ms"], 1),
            gateway_overhead_ms=round(hop["overhead_ms"], 1),
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
