"""serving: the OpenAI-compatible server answers the official `openai` client and refuses bad requests.

Servers bind 127.0.0.1 on a free port; every client call has a timeout and loops are bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, run_skill
from skillbook.errors import ConfigError
from skillbook.ml import serve_app, serve_backends, serve_clients

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def gguf_file(pretrained_model, tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[serve]')")
    from skillbook.ml.gguf_export import write_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf"
    write_gguf(pretrained_model, path, "Q8_0")
    return path


@pytest.fixture(scope="module")
def hf_server(pretrained_model):
    """The transformers backend behind the app, with an API key."""
    backend = serve_backends.TransformersBackend(pretrained_model, device="cpu", model_id="tiny")
    with serve_app.ServerThread(serve_app.create_app(backend, api_key="sekret"), port=serve_app.free_port()) as srv:
        yield srv


@pytest.fixture(scope="module")
def gguf_server(gguf_file):
    backend = serve_backends.LlamaCppBackend(gguf_file, n_threads=2, model_id="tiny-gguf")
    with serve_app.ServerThread(serve_app.create_app(backend), port=serve_app.free_port()) as srv:
        yield srv


def client(srv, key="sekret"):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, timeout=60, max_retries=0)


PROSE = "Mira has a kite. The kite is"  # a base model trained on the corpus continues this


def post(url: str, body: bytes, key: str | None = "sekret") -> tuple[int, dict]:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---- the official client: completions, chat, streaming, sampling parameters --------------------


@pytest.mark.parametrize("which", ["hf_server", "gguf_server"])
def test_openai_client_completion_chat_and_stream(which, request):
    srv = request.getfixturevalue(which)
    c = client(srv)
    model = c.models.list().data[0].id
    # The pretrained base never saw the Question/Answer format and may stop at once there, so ask for prose.
    comp = c.completions.create(model=model, prompt=PROSE, max_tokens=8, temperature=0)
    assert comp.choices[0].finish_reason in ("stop", "length") and 0 < comp.usage.completion_tokens <= 8
    msgs = [{"role": "user", "content": "What colour is Mira's kite?"}]
    chat = c.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    parts = [
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, stream=True)
    ]
    assert len(parts) > 1 and "".join(parts) == chat.choices[0].message.content  # greedy: stream == non-stream


@pytest.mark.parametrize("which", ["hf_server", "gguf_server"])
def test_sampling_parameters_are_honoured(which, request):
    c = client(request.getfixturevalue(which))
    model = c.models.list().data[0].id
    kw = dict(model=model, prompt="Mira", max_tokens=12, temperature=1.5, top_p=0.95, extra_body={"top_k": 50})
    a = c.completions.create(seed=7, **kw).choices[0].text
    assert a == c.completions.create(seed=7, **kw).choices[0].text  # seed makes sampling repeatable
    texts = {c.completions.create(seed=s, **kw).choices[0].text for s in range(4)}
    assert len(texts) > 1  # temperature actually samples
    # stop: the same seeded sample with a stop string taken from its middle ends right before it
    seed, text = next((sd, t) for sd in range(20) if len(t := c.completions.create(seed=sd, **kw).choices[0].text) >= 4)
    stop = text[2:4]
    stopped = c.completions.create(seed=seed, stop=[stop], **kw)
    assert stopped.choices[0].text == text[: text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    assert c.completions.create(model=model, prompt="Mira", max_tokens=3, temperature=0).usage.completion_tokens <= 3


def test_gguf_chat_prompt_equals_transformers_chat_template(gguf_file, pretrained_model):
    """The llama-cpp backend renders chats from the GGUF's template exactly as apply_chat_template does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pretrained_model)
    backend = serve_backends.LlamaCppBackend(gguf_file, n_ctx=128)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What colour is Mira's kite?"},
    ]
    assert backend.chat_prompt(msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# ---- bad requests: clear 4xx, and the server keeps serving ----------------------------------------


def test_bad_requests_get_4xx_and_server_survives(hf_server):
    url = f"{hf_server.url}/v1/completions"
    code, body = post(url, b'{"model": "tiny", "prompt": ')
    assert code == 400 and "not valid JSON" in body["error"]["message"]
    code, body = post(url, json.dumps({"model": "gpt-9", "prompt": "hi"}).encode())
    assert code == 404 and "gpt-9" in body["error"]["message"] and "tiny" in body["error"]["message"]
    code, body = post(url, json.dumps({"model": "tiny", "prompt": "Mira " * 5000, "max_tokens": 4}).encode())
    assert (
        code == 400
        and body["error"]["code"] == "context_length_exceeded"
        and "maximum context length" in body["error"]["message"]
    )
    code, body = post(url, json.dumps({"model": "tiny", "prompt": "hi", "temperature": 9}).encode())
    assert code == 400 and "temperature" in body["error"]["message"]
    code, body = post(url, json.dumps({"model": "tiny", "prompt": "hi"}).encode(), key="wrong")
    assert code == 401
    with pytest.raises(openai.NotFoundError):
        client(hf_server).completions.create(model="nope", prompt="hi", max_tokens=2)
    code, body = post(url, json.dumps({"model": "tiny", "prompt": "Mira", "max_tokens": 2}).encode())
    assert code == 200 and body["choices"][0]["text"] is not None


def test_sixteen_concurrent_clients_all_succeed(gguf_server):
    res = serve_clients.load_test(gguf_server.url, clients=16, requests_per_client=1, max_tokens=8)
    assert res["succeeded"] == 16 and res["failed"] == 0, res["errors"]
    assert res["latency_p95_s"] >= res["latency_p50_s"] > 0 and res["generated_tokens_per_s"] > 0


# ---- the recipe: smoke mode, backend choice, vLLM command, clean shutdown on SIGTERM ---------------


def test_smoke_run_writes_report(gguf_file, tmp_path):
    res = run_skill(
        "serving", tmp_path, {"model": str(gguf_file), "smoke": True, "port": 0, "load_clients": 4, "prompt": PROSE}
    )
    report = json.loads(Path(res["outputs"]["report"]["path"]).read_text())
    assert report["backend"] == "llama-cpp" and report["smoke"]["ok"] is True
    assert res["summary"]["smoke_ok"] is True and res["summary"]["load_failed"] == 0


def test_vllm_command_line():
    argv = serve_backends.vllm_argv(
        "/models/llama-8b",
        8001,
        tensor_parallel_size=4,
        gpu_memory_utilization=0.85,
        max_model_len=8192,
        quantization="awq",
        served_model_name="llama",
        api_key="k",
    )
    assert argv[:3] == ["vllm", "serve", "/models/llama-8b"]
    pairs = dict(zip(argv[3::2], argv[4::2]))
    assert pairs == {
        "--host": "127.0.0.1",
        "--port": "8001",
        "--tensor-parallel-size": "4",
        "--gpu-memory-utilization": "0.85",
        "--dtype": "auto",
        "--max-model-len": "8192",
        "--quantization": "awq",
        "--served-model-name": "llama",
        "--api-key": "k",
    }
    assert "--quantization" not in serve_backends.vllm_argv("m", 1)


def test_backend_choice_and_refusals(gguf_file, pretrained_model, tmp_path):
    import torch

    rec_mod = __import__("skillbook.run.recipe", fromlist=["load"])
    serving = rec_mod.load(ROOT / "skills" / "serving")
    cfg = lambda **kw: rec_mod.resolve(serving, overrides=kw)  # noqa: E731
    mod = sys.modules["skillbook_recipes.serving"]
    assert mod.pick_backend(cfg(model=str(gguf_file)), gguf_file) == "llama-cpp"
    assert mod.pick_backend(cfg(model=str(pretrained_model)), pretrained_model) == "transformers"
    with pytest.raises(ConfigError, match="llama-cpp serves a .gguf"):
        mod.pick_backend(cfg(model=str(pretrained_model), backend="llama-cpp"), pretrained_model)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="vllm needs a CUDA GPU"):
            run_skill("serving", tmp_path, {"model": str(pretrained_model), "backend": "vllm", "smoke": True})
    with pytest.raises(ConfigError, match="vllm.tensor_parallel_size"):
        cfg(model="x", vllm={"tensor_parallel_size": 0})


def test_sigterm_stops_the_server_cleanly(gguf_file, tmp_path):
    """`skills run serving` prints the URL once healthy; SIGTERM then stops it with exit status 0."""
    import threading

    port = serve_app.free_port()
    env = {**os.environ, "SKILLBOOK_RUNS": str(tmp_path)}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "skills"),
            "run",
            "serving",
            "--set",
            f"model={gguf_file}",
            "--set",
            f"port={port}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines, ready = [], threading.Event()

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)
            if f"http://127.0.0.1:{port}/v1" in line:
                ready.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert ready.wait(timeout=120), "".join(lines)[-2000:]
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-2000:]
    report = json.loads(next(tmp_path.glob("serving/*/serving.json")).read_text())
    assert report["stopped_by"] == "SIGTERM"
    with pytest.raises(OSError):  # the port is closed again
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
