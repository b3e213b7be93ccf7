"""The maintained OpenAI-compatible servers, run as subprocesses: command lines, start, readiness, stop.

Three servers, one per backend, each its project's own: `python -m llama_cpp.server` (llama-cpp-python,
a .gguf file), `transformers serve` (any hf-model dir, continuous batching) and `vllm serve` (GPU), plus
the gateway in front of them (skillbook.ml.gateway; `ModelInfo` is what it reads from the model).
`ServerProcess` starts one with its output in a log file, refuses a port that is already taken, waits
until the server answers `GET /v1/models` with the model id it was started with (so a test never talks
to someone else's server), and stops it with SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def llama_cpp_argv(
    gguf: str | Path,
    port: int,
    host: str = "127.0.0.1",
    model_id: str = "model",
    n_ctx: int = 0,
    threads: int = 1,
    api_key: str | None = None,
) -> list[str]:
    """`python -m llama_cpp.server` for one GGUF file (llama-cpp-python's server; one request at a time)."""
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model_id]
    argv += ["--host", host, "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads)]
    argv += ["--n_threads_batch", str(threads), "--verbose", "false"]
    # A queued request would otherwise cut the running stream short (it ends with [DONE], no error).
    argv += ["--interrupt_requests", "false"]
    return argv + (["--api_key", api_key] if api_key else [])


def transformers_argv(
    model_id: str,
    port: int,
    host: str = "127.0.0.1",
    device: str = "auto",
    dtype: str = "auto",
    continuous_batching: bool = True,
    kv_blocks: int | None = None,
    max_batch_tokens: int | None = None,
) -> list[str]:
    """`transformers serve MODEL_ID` pinned to one model (run with the model folder as cwd/MODEL_ID)."""
    exe = Path(sys.executable).with_name("transformers")
    argv = [str(exe) if exe.exists() else "transformers", "serve", model_id, "--host", host, "--port", str(port)]
    argv += ["--device", device, "--dtype", dtype, "--log-level", "info"]
    argv.append("--continuous-batching" if continuous_batching else "--no-continuous-batching")
    if continuous_batching and kv_blocks:
        argv += ["--cb-num-blocks", str(kv_blocks)]
    if continuous_batching and max_batch_tokens:
        argv += ["--cb-max-batch-tokens", str(max_batch_tokens)]
    return argv


# transformers serve parses chat replies of these model types with Qwen's ChatML response template
# (transformers.cli.serving.utils._RESPONSE_TEMPLATE_FALLBACKS), whatever chat template the model has.
CHATML_FALLBACK_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_text")


def transformers_model_dir(model_dir: Path, parent: Path, model_id: str) -> Path:
    """`parent/model_id`: the folder transformers serve loads, named as clients will call the model.

    A symlink to `model_dir`, except for a Qwen-type model whose chat template is not ChatML: transformers
    serve would parse its chat replies as ChatML and answer with the prompt. That one gets a folder of
    symlinks whose tokenizer_config.json adds a response template: all generated text up to EOS is content.
    """
    import re

    target = parent / model_id
    if target.exists() or target.is_symlink():
        return target
    config = json.loads((model_dir / "config.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    jinja = model_dir / "chat_template.jinja"
    template = jinja.read_text() if jinja.exists() else str(tok_config.get("chat_template", ""))
    eos = tok_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    needs_parser = (
        config.get("model_type") in CHATML_FALLBACK_TYPES
        and "<|im_start|>" not in template
        and "response_template" not in tok_config
        and isinstance(eos, str)
    )
    if not needs_parser:
        target.symlink_to(model_dir.resolve(), target_is_directory=True)
        return target
    target.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (target / f.name).symlink_to(f.resolve())
    content = {"content": "text", "close_pattern": re.escape(str(eos))}
    tok_config["response_template"] = {"start_anchor_pattern": r"\Z", "fields": {"content": content}}
    (target / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return target


def vllm_argv(
    model: str,
    port: int,
    host: str = "127.0.0.1",
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    quantization: str | None = None,
    served_model_name: str | None = None,
    api_key: str | None = None,
    dtype: str = "auto",
    extra: list[str] | None = None,
) -> list[str]:
    """The `vllm serve` command line (vLLM's own OpenAI server) for one model."""
    argv = ["vllm", "serve", str(model), "--host", host, "--port", str(port)]
    argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
    argv += ["--gpu-memory-utilization", str(gpu_memory_utilization), "--dtype", dtype]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if quantization:
        argv += ["--quantization", quantization]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if api_key:
        argv += ["--api-key", api_key]
    return argv + list(extra or [])


def gateway_argv(
    backend: str,
    model_id: str,
    model: str | Path | None,
    port: int,
    host: str = "127.0.0.1",
    n_ctx: int = 0,
    max_tokens: int | None = None,
    max_concurrent: int = 1,
    max_queue: int = 16,
    request_timeout: float = 300.0,
    guard: str | Path | None = None,
) -> list[str]:
    """`python -m skillbook.ml.gateway` in front of `backend`; no secret in it (the key goes in $SKILLBOOK_API_KEY)."""
    argv = [sys.executable, "-m", "skillbook.ml.gateway", "--backend", backend, "--model-id", model_id]
    argv += ["--chat-template-from", str(model)] if model else []
    argv += ["--host", host, "--port", str(port), "--n-ctx", str(n_ctx), "--max-concurrent", str(max_concurrent)]
    argv += ["--max-queue", str(max_queue), "--request-timeout", str(request_timeout)]
    return argv + (["--max-tokens", str(max_tokens)] if max_tokens else []) + (["--guard", str(guard)] if guard else [])


@dataclass
class ModelInfo:
    """What the gateway reads once from the served model: chat template, special tokens, context, tokenizer."""

    template: str | None  # the model's jinja2 chat template (None: chats are forwarded unchecked)
    bos: str = ""
    eos: str = ""
    n_ctx: int = 2048
    count: Any = None  # text -> prompt tokens as the upstream counts them (None: not checked)

    @classmethod
    def load(cls, path: str | Path | None, n_ctx: int = 0) -> ModelInfo:
        """From a .gguf (gguf's GGUFReader; llama.cpp's vocab-only tokenizer) or an hf-model dir (AutoTokenizer)."""
        if path is None:
            return cls(None, n_ctx=n_ctx or 2048)
        if str(path).endswith(".gguf"):
            from gguf import GGUFReader
            from llama_cpp import Llama

            fields = GGUFReader(str(path)).fields
            meta = lambda key, default=None: fields[key].contents() if key in fields else default  # noqa: E731
            tokens = fields["tokenizer.ggml.tokens"]
            bos, eos = (tokens.contents(int(meta(f"tokenizer.ggml.{t}_token_id", 0))) for t in ("bos", "eos"))
            ctx = n_ctx or int(meta(f"{meta('general.architecture')}.context_length", 2048))
            vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
            # llama.cpp's count: BOS + the text with special tokens parsed (add_bos=False: no double-BOS warning)
            count = lambda text: 1 + len(vocab.tokenize(text.encode(), add_bos=False, special=True))  # noqa: E731
            return cls(meta("tokenizer.chat_template"), bos, eos, ctx, count)
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        ctx = n_ctx or int(getattr(AutoConfig.from_pretrained(str(path)), "max_position_embeddings", 0) or 2048)
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        return cls(template, str(tok.bos_token or ""), str(tok.eos_token or ""), ctx, lambda t: len(tok.encode(t)))

    def render(self, messages: list[dict]) -> str:
        """The chat prompt as the upstreams render it: a sandbox, trim/lstrip blocks, raise_exception raises."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=time.strftime)
        template = env.from_string(self.template or "")
        return template.render(messages=messages, bos_token=self.bos, eos_token=self.eos, add_generation_prompt=True)


def start_gateway(
    backend: ServerProcess, model: Path | None, port: int, log: Path, api_key: str | None = None, **kw: Any
) -> ServerProcess:
    """Start the gateway on `port` in front of a running backend (the key through the environment); ready when
    it lists the backend's model id. `kw`: gateway_argv's host, n_ctx, max_concurrent, max_queue, ..."""
    host = kw.get("host", "127.0.0.1")
    local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # where this machine reaches it
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}"
    argv = gateway_argv(backend.url, backend.model_id, model, port, **kw)
    gateway = ServerProcess(argv, url, backend.model_id, log, api_key)
    gateway.start(120, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SKILLBOOK_API_KEY": api_key or ""})
    return gateway


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (or binding it fails for another reason)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no listener
        try:
            s.bind((host, port))
        except OSError:
            return True
    with socket.socket() as s:  # a server bound to 0.0.0.0 does not always block a loopback bind
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "localhost") else host, port)) == 0


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the recipe dies, even by SIGKILL (Linux), so no server is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def get_json(url: str, api_key: str | None = None, timeout: float = 2.0) -> tuple[int, dict]:
    """GET url -> (status, JSON body); status 0 when nothing answered."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return 0, {}


class ServerProcess:
    """One server subprocess: started with `start()`, ready when it lists `model_id`, stopped by `stop()`."""

    def __init__(self, argv: list[str], url: str, model_id: str, log: Path, api_key: str | None = None):
        self.argv, self.url, self.model_id, self.log, self.api_key = argv, url, model_id, log, api_key
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None) -> float:
        """Start the server and wait until it is ready; returns the seconds that took."""
        t0 = time.perf_counter()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches the recipe, which stops the server itself
                preexec_fn=_die_with_parent,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:  # failed or interrupted start: never leave a server behind
            self.stop()
            raise
        return time.perf_counter() - t0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float) -> None:
        """Poll GET /v1/models until it lists our model id; raise with the log tail if the child died."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError(f"the server exited before it was ready; {self.log}:\n{self.log_tail()}")
            status, body = get_json(f"{self.url}/v1/models", self.api_key)
            if status == 200:
                ids = [m.get("id") for m in body.get("data", [])]
                if self.model_id not in ids:  # someone else's server on our port: never test it
                    raise RuntimeError(f"{self.url} serves {ids}, not {self.model_id!r}: not the server started here")
                return
            time.sleep(0.2)
        raise RuntimeError(f"the server at {self.url} was not ready within {timeout:.0f} s; {self.log}")

    def stop(self, grace: float = 5.0) -> float:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:  # a hung server is killed rather than left behind
                self.proc.kill()
                self.proc.wait(timeout=10)
        return time.perf_counter() - t0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C (`signal.signal(SIGTERM, on_sigterm)`), so every `finally`
    of the serving recipe stops its servers."""


def on_sigterm(signum, frame):
    raise Terminated()


def wait_for_signal(*servers) -> str:
    """Block until Ctrl-C or SIGTERM (or a server dies); return which one it was."""
    try:
        while all(s.alive() for s in servers):
            time.sleep(0.5)
        return "server exited"
    except Terminated:
        return "SIGTERM"
    except KeyboardInterrupt:
        return "SIGINT"
