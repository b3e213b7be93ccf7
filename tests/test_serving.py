"""serving: the maintained OpenAI servers answer the official `openai` client, concurrently, for every family.

Backends: `python -m llama_cpp.server` (GGUF) and `transformers serve` (hf-model dir, continuous batching),
each started by the recipe as a subprocess behind the gateway (which holds the API key, for both backends;
tests/test_gateway.py tests the gateway itself). One server per family per backend: the recipe's smoke mode
runs the smoke test and an 8-client load test against it. The live-server tests (API key, disconnects, batching)
share one llama server per backend. Servers bind 127.0.0.1 on a free port; every call has a timeout.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, run_skill
from families import FAMILIES
from skillbook.errors import ConfigError
from skillbook.ml import serve_clients, serve_procs

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp.server.app", reason="pip install -e '.[serve]' (llama-cpp-python[server])")

PROSE = "Mira has a kite. The kite is"


CASES = [("llama-cpp", f) for f in FAMILIES] + [("transformers", f) for f in FAMILIES]


@pytest.mark.family_matrix("serving")
@pytest.mark.parametrize("backend,family", CASES)
def test_openai_clients_concurrently_on_family(backend, family, family_model, family_gguf, tmp_path):
    """The recipe starts the family's server, the official client passes the smoke test, 8 clients at once
    (32 on the llama GGUF: the gateway queues what llama.cpp serves one at a time, none fails)."""
    model = family_gguf(family) if backend == "llama-cpp" else family_model(family)
    sets = {"model": str(model), "smoke": True, "port": 0, "prompt": PROSE, "max_tokens": 4, "api_key": "k3y"}
    clients = 32 if (backend, family) == ("llama-cpp", "llama") else 8
    res = run_skill("serving", tmp_path, {**sets, "load_clients": clients, "load_requests": 1})
    report = json.loads(Path(res["outputs"]["report"]["path"]).read_text())
    assert report["backend"] == backend and report["startup_s"] > 0 and report["stop_s"] < 6
    assert report["gateway_stop_s"] < 6 and report["url"] != report["backend_url"]
    assert ("llama_cpp.server" in report["command"]) == (backend == "llama-cpp")
    # the gateway fronts every backend and holds the key (transformers serve has none): never in a command line
    assert "skillbook.ml.gateway" in report["gateway_command"] and "k3y" not in json.dumps(report)
    smoke = report["smoke"]
    assert smoke["ok"], smoke  # greedy: streamed chat == non-streamed chat
    hop = report["hop"]  # the gateway's cost: medians of the same completion direct and through it
    assert hop["requests"] == 20 and 0 < hop["direct_ms"] and 0 < hop["gateway_ms"], hop
    assert smoke["model"] == (model.stem if backend == "llama-cpp" else model.name)
    # llama_cpp.server counts usage by re-tokenizing the text, which can give max_tokens + 1
    assert 0 < smoke["completion"]["completion_tokens"] <= 5 and smoke["stream"]["chunks"] >= 1
    load = report["load"]
    assert load["succeeded"] == clients and load["failed"] == 0, load["errors"]
    assert (Path(res["run_dir"]) / "server.log").stat().st_size > 0
    gateway_log = (Path(res["run_dir"]) / "gateway.log").read_text()
    assert gateway_log.count("POST /v1/completions status=200") >= clients + 1  # smoke + each load client


# ---- live servers (llama family): API key, disconnects, continuous batching --------------------------


def start(backend: str, model: Path, tmp: Path, api_key: str | None = None) -> serve_procs.ServerProcess:
    port = serve_procs.free_port()
    env, cwd = {}, None
    if backend == "llama-cpp":
        argv = serve_procs.llama_cpp_argv(model, port, model_id="tiny", api_key=api_key)
    else:
        cwd = tmp
        serve_procs.transformers_model_dir(model, cwd, "tiny")
        argv = serve_procs.transformers_argv("tiny", port, device="cpu", kv_blocks=16, max_batch_tokens=256)
        env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server = serve_procs.ServerProcess(argv, f"http://127.0.0.1:{port}", "tiny", tmp / "server.log", api_key)
    server.start(180, cwd=cwd, env=env)
    if backend == "transformers":
        serve_clients.warm_up(server.url, "tiny")
    return server


@pytest.fixture(scope="module", params=["llama-cpp", "transformers"])
def live(request, family_model, family_gguf, tmp_path_factory):
    backend = request.param
    model = family_gguf("llama") if backend == "llama-cpp" else family_model("llama")
    key = "sekret" if backend == "llama-cpp" else None  # transformers serve has no API key
    server = start(backend, model, tmp_path_factory.mktemp(backend), key)
    yield backend, server
    assert server.stop() < 5  # SIGTERM is enough: stopped within 5 s, no SIGKILL after the grace period


def client(server, key: str | None = None):
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=key or server.api_key or "none", timeout=60, max_retries=0
    )


def test_api_key_is_enforced(live):
    backend, server = live
    if backend != "llama-cpp":
        pytest.skip("transformers serve has no API key; the gateway in front of it holds one (test_gateway.py)")
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model="tiny", prompt="Mira", max_tokens=2)
    status, _ = serve_procs.get_json(f"{server.url}/v1/models", api_key=None)
    assert status == 401
    assert client(server).completions.create(model="tiny", prompt="Mira", max_tokens=2).usage.completion_tokens > 0


def test_streams_disconnected_midway_do_not_block_the_next_request(live):
    """20 clients drop a stream after its first event; a completion still answers within 2 s (and the fixture
    then stops the server on SIGTERM within 5 s, no SIGKILL)."""
    import httpx

    _, server = live
    headers = {"authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    for _ in range(20):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event, then hang up
    t = time.perf_counter()
    out = client(server).completions.create(model="tiny", prompt="Mira", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens > 0 and time.perf_counter() - t < 2


def test_continuous_batching_serves_concurrent_streams_together(live):
    """8 concurrent streams on transformers serve take far less than 8 streams one after another: they are
    decoded in one batch. (llama_cpp.server runs them one at a time, behind its lock.)"""
    backend, server = live
    if backend != "transformers":
        pytest.skip("llama_cpp.server has no batching; see references/backends.md for llama.cpp's llama-server")
    c, msgs = client(server), [{"role": "user", "content": "Tell me about the kite"}]

    spans: list[tuple[float, float]] = []

    def one(_: int) -> int:
        chunks = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=32, stream=True)
        times = [time.perf_counter() for ch in chunks if ch.choices and ch.choices[0].delta.content]
        spans.append((times[0], times[-1]) if times else (0.0, 0.0))
        return len(times)

    t = time.perf_counter()
    sequential = [one(i) for i in range(8)]
    sequential_s, t = time.perf_counter() - t, time.perf_counter()
    spans.clear()
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, range(8)))
    concurrent_s = time.perf_counter() - t
    # the most streams generating at one moment: first to last content chunk of each, overlapped
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    generating = max(itertools.accumulate(step for _, step in events))
    print(f"8 streams: at most {generating} generating at once; {concurrent_s:.2f} s vs {sequential_s:.2f} s in turn")
    assert concurrent == sequential and min(concurrent) > 0
    assert generating > 1 and concurrent_s < 0.6 * sequential_s, (generating, concurrent_s, sequential_s)


def test_sampling_parameters_reach_llama_cpp(live):
    backend, server = live
    if backend != "llama-cpp":
        pytest.skip("continuous batching in transformers 5.x shares the first request's sampling settings")
    c = client(server)
    kw = dict(model="tiny", prompt="Mira", max_tokens=12, temperature=1.5, top_p=0.95, extra_body={"top_k": 50})
    assert c.completions.create(seed=7, **kw).choices[0].text == c.completions.create(seed=7, **kw).choices[0].text
    assert len({c.completions.create(seed=s, **kw).choices[0].text for s in range(4)}) > 1


# ---- refusals: before any server starts ---------------------------------------------------------------


def test_busy_port_is_refused_before_anything_starts(family_gguf, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port: 127.0.0.1:{port} is already in use"):
            run_skill("serving", tmp_path, {"model": str(family_gguf("llama")), "smoke": True, "port": port})


def test_exposure_without_a_key_and_bad_combinations_are_refused(family_gguf, family_model, tmp_path):
    gguf, hf = str(family_gguf("llama")), str(family_model("llama"))
    with pytest.raises(ConfigError, match="host: 0.0.0.0 exposes the server"):
        run_skill("serving", tmp_path, {"model": gguf, "host": "0.0.0.0"})
    rec_mod = __import__("skillbook.run.recipe", fromlist=["load"])  # transformers gets a key: the gateway's
    assert rec_mod.resolve(rec_mod.load(ROOT / "skills" / "serving"), overrides={"model": hf, "api_key": "k"}).api_key
    with pytest.raises(ConfigError, match="model_id"):
        run_skill("serving", tmp_path, {"model": gguf, "model_id": "../x"})
    assert not list(tmp_path.glob("serving/*"))  # refused at config validation: no run dir


def test_backend_choice_and_refusals(family_gguf, family_model, tmp_path):
    import torch

    rec_mod = __import__("skillbook.run.recipe", fromlist=["load"])
    serving = rec_mod.load(ROOT / "skills" / "serving")
    cfg = lambda **kw: rec_mod.resolve(serving, overrides=kw)  # noqa: E731
    mod = sys.modules["skillbook_recipes.serving"]
    gguf, hf = family_gguf("llama"), family_model("llama")
    assert mod.pick_backend(cfg(model=str(gguf)), gguf) == "llama-cpp"
    assert mod.pick_backend(cfg(model=str(hf)), hf) == "transformers"
    with pytest.raises(ConfigError, match="llama-cpp serves a .gguf"):
        mod.pick_backend(cfg(model=str(hf), backend="llama-cpp"), hf)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="vllm needs a CUDA GPU"):
            run_skill("serving", tmp_path, {"model": str(hf), "backend": "vllm", "smoke": True})
    with pytest.raises(ConfigError, match="vllm.tensor_parallel_size"):
        cfg(model="x", vllm={"tensor_parallel_size": 0})


def test_command_lines():
    argv = serve_procs.vllm_argv(
        "/models/llama-8b", 8001, tensor_parallel_size=4, gpu_memory_utilization=0.85, max_model_len=8192,
        quantization="awq", served_model_name="llama", api_key="k",
    )  # fmt: skip
    assert argv[:3] == ["vllm", "serve", "/models/llama-8b"]
    assert dict(zip(argv[3::2], argv[4::2])) == {
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
    lc = serve_procs.llama_cpp_argv("m.gguf", 9, model_id="m", threads=4, api_key="k")
    assert lc[1:3] == ["-m", "llama_cpp.server"] and dict(zip(lc[3::2], lc[4::2]))["--interrupt_requests"] == "false"
    tf = serve_procs.transformers_argv("m", 9, kv_blocks=16, max_batch_tokens=256)
    assert tf[1:3] == ["serve", "m"] and "--continuous-batching" in tf and "--cb-num-blocks" in tf
    assert "--cb-num-blocks" not in serve_procs.transformers_argv("m", 9, continuous_batching=False, kv_blocks=16)


# ---- serving until SIGTERM ----------------------------------------------------------------------------


def test_sigterm_stops_the_server_and_writes_the_report(family_gguf, tmp_path):
    """`skills run serving` prints the URL once ready; SIGTERM stops it (and its server) within seconds."""
    port = serve_procs.free_port()
    env = {**os.environ, "SKILLBOOK_RUNS": str(tmp_path)}
    argv = [str(Path(sys.executable).parent / "skills"), "run", "serving", "--set", f"model={family_gguf('llama')}"]
    proc = subprocess.Popen(
        [*argv, "--set", f"port={port}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).status == 200
        t = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.perf_counter() - t < 8
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-2000:]
    report = json.loads(next(tmp_path.glob("serving/*/serving.json")).read_text())
    assert report["stopped_by"] == "SIGTERM" and report["stop_s"] < 6 and report["startup_s"] > 0
    assert report["gateway_stop_s"] < 6
    assert not serve_procs.port_in_use("127.0.0.1", port)  # the server child is gone too
