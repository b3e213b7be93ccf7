"""The maintained OpenAI-compatible servers, run as subprocesses: command lines, start, readiness, stop.

Three servers, one per backend, each its project's own: `python -m llama_cpp.server` (llama-cpp-python,
a .gguf file), `transformers serve` (any hf-model dir, continuous batching) and `vllm serve` (GPU).
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
from pathlib import Path


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
