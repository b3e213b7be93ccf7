"""gateway: the proxy the serving recipe puts in front of every backend cannot be wedged, and speaks OpenAI.

Live: llama_cpp.server on the tiny llama GGUF behind the gateway (one request at a time), and transformers
serve with continuous batching behind it (8 streams at once). A tiny Starlette app stands in for a slow or
failing upstream where the test needs one on demand (a full queue, a timeout, an upstream 500). Every
server binds 127.0.0.1 on a free port; every call has a timeout.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest

from skillbook.ml import gateway, serve_clients, serve_procs

httpx = pytest.importorskip("httpx")
pytest.importorskip("llama_cpp.server.app", reason="pip install -e '.[serve]' (llama-cpp-python[server])")

KEY = "sekret"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_TOKENS = 16  # the gateway's max_tokens bound: what schemathesis may ask for


def start_llama(gguf: Path, tmp: Path, **gateway_kw) -> tuple[serve_procs.ServerProcess, serve_procs.ServerProcess]:
    port = serve_procs.free_port()
    argv = serve_procs.llama_cpp_argv(gguf, port, model_id="tiny", api_key=KEY)
    backend = serve_procs.ServerProcess(argv, f"http://127.0.0.1:{port}", "tiny", tmp / "server.log", KEY)
    backend.start(120)
    try:
        gw = serve_procs.start_gateway(backend, gguf, serve_procs.free_port(), tmp / "gateway.log", KEY, **gateway_kw)
    except BaseException:
        backend.stop()
        raise
    return backend, gw


@pytest.fixture(scope="module")
def llama(family_gguf, tmp_path_factory):
    """llama_cpp.server + the gateway (max_concurrent 1, max_tokens <= 16); both must stop on SIGTERM in 5 s."""
    backend, gw = start_llama(family_gguf("llama"), tmp_path_factory.mktemp("gw-llama"), max_tokens=MAX_TOKENS)
    yield gw
    assert gw.stop() < 5 and backend.stop() < 5  # SIGTERM was enough: no SIGKILL after the grace period


def assert_openai_error(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert code is None or err["code"] == code, err
    assert param is None or err["param"] == param, err
    return err


# ---- the judged lines: disconnects, SIGTERM -----------------------------------------------------------------


def test_twenty_dropped_streams_then_a_completion_within_2s(llama):
    """Each client hangs up after the first event; the gateway closes the upstream stream at once, so
    llama_cpp.server's lock and the gateway's single slot are free for the next request."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS, "stream": True}
    for _ in range(20):
        with httpx.stream("POST", f"{llama.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event, then hang up
    t = time.perf_counter()
    out = httpx.post(f"{llama.url}/v1/completions", json={"model": "tiny", "prompt": "Mira", "max_tokens": 2},
                     headers=AUTH, timeout=10)  # fmt: skip
    elapsed = time.perf_counter() - t
    print(f"completion after 20 dropped streams: {elapsed:.3f} s")
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] > 0 and elapsed < 2
    assert httpx.get(f"{llama.url}/health", timeout=5).json()["in_flight"] == 0


# ---- OpenAI-shaped errors, auth -----------------------------------------------------------------------------


def test_loglikelihood_requests_pass(llama):
    """lm-eval's loglikelihood tasks send echo + logprobs: the gateway forwards them, the prompt's log-probs
    come back (llama.cpp computes them), and a logprobs count out of range is a 400 naming the field."""
    body = {"model": "tiny", "prompt": "Anna lives in", "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    resp = httpx.post(llama.url + "/v1/completions", json=body, headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    logprobs = resp.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) >= 3 and all(x is None or x <= 0 for x in logprobs["token_logprobs"])
    bad = httpx.post(llama.url + "/v1/completions", json={**body, "logprobs": 99}, headers=AUTH, timeout=10)
    assert_openai_error(bad, 400, param="logprobs")


def test_errors_are_openai_shaped(llama):
    url, post = llama.url, lambda path, **kw: httpx.post(llama.url + path, timeout=10, **kw)  # noqa: E731
    chat = lambda **kw: {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kw}  # noqa: E731
    assert_openai_error(post("/v1/completions", content=b"\xff\xfe", headers=AUTH), 400, "invalid_encoding")
    assert_openai_error(post("/v1/completions", content=b'{"model": "tiny", "prompt": "\\ud800"}', headers=AUTH),
                        400, "invalid_encoding")  # fmt: skip
    assert_openai_error(post("/v1/completions", content=b"{not json", headers=AUTH), 400, "invalid_json")
    assert_openai_error(post("/v1/completions", content=b" " * (1 << 20 | 1), headers=AUTH), 413, "request_too_large")
    assert_openai_error(post("/v1/completions", json=[1, 2], headers=AUTH), 400, "invalid_type")
    assert_openai_error(post("/v1/chat/completions", json=chat(temperature=3), headers=AUTH), 400, param="temperature")
    assert_openai_error(post("/v1/chat/completions", json=chat(max_tokens=MAX_TOKENS + 1), headers=AUTH), 400,
                        param="max_tokens")  # fmt: skip
    bad_role = {"model": "tiny", "messages": [{"role": "", "content": "x"}]}
    assert_openai_error(post("/v1/chat/completions", json=bad_role, headers=AUTH), 400, param="messages.0.role")
    # role "tool" is in the schema, but this model's template rejects it: llama_cpp.server would answer 500
    tool = {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}
    err = assert_openai_error(post("/v1/chat/completions", json=tool, headers=AUTH), 400, "invalid_chat")
    assert "chat roles are system, user and assistant" in err["message"]
    too_long = {"model": "tiny", "prompt": "Mira " * 400, "max_tokens": 2}
    assert_openai_error(post("/v1/completions", json=too_long, headers=AUTH), 400, "context_length_exceeded")
    assert_openai_error(post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer nope"}), 401,
                        "invalid_api_key")  # fmt: skip
    assert_openai_error(httpx.get(f"{url}/v1/models", timeout=5), 401, "invalid_api_key")
    assert_openai_error(post("/v1/chat/completions", json=chat(model="gpt-4"), headers=AUTH), 404, "model_not_found")
    assert_openai_error(httpx.get(f"{url}/v1/nope", headers=AUTH, timeout=5), 404)
    assert_openai_error(httpx.delete(f"{url}/v1/models", headers=AUTH, timeout=5), 405)
    assert_openai_error(httpx.get(f"{url}/v1/completions", headers=AUTH, timeout=5), 405)
    # and the good path through the official client: text parts become one string, max_completion_tokens counts
    parts = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
             "max_completion_tokens": 3}  # fmt: skip
    assert post("/v1/chat/completions", json=parts, headers=AUTH).json()["usage"]["completion_tokens"] <= 4


def test_the_key_is_compared_in_constant_time(family_gguf):
    from starlette.testclient import TestClient

    settings = gateway.Settings("http://127.0.0.1:9", "tiny", api_key=KEY)  # nothing upstream is needed
    with mock.patch.object(gateway.hmac, "compare_digest", wraps=gateway.hmac.compare_digest) as compare:
        with TestClient(gateway.build_app(settings)) as client:
            assert client.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
            assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    assert [c.args for c in compare.call_args_list] == [(b"Bearer wrong", AUTH["authorization"].encode())] + [
        (AUTH["authorization"].encode(),) * 2
    ]


# ---- queue, timeout, upstream failures: a stand-in upstream that is slow or fails on demand -----------------


class FakeUpstream:
    """A Starlette app on uvicorn in a thread: prompt "slow" streams 50 chunks 0.1 s apart (non-streamed: 5 s),
    "boom" answers 500, "detail" answers 422 {"detail": ...} (llama_cpp.server's shape). Records stream ends."""

    def __init__(self) -> None:
        import asyncio

        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        self.closed: list[float] = []

        async def completions(request):
            body = await request.json()
            if body["prompt"] == "boom":
                return JSONResponse({"detail": "kaputt"}, 500)
            if body["prompt"] == "detail":
                return JSONResponse({"detail": [{"loc": ["body", "x"], "msg": "bad"}]}, 422)
            if body["prompt"] == "slow" and not body.get("stream"):
                await asyncio.sleep(5)

            async def chunks():
                try:
                    for i in range(50 if body["prompt"] == "slow" else 1):
                        yield f"data: {json.dumps({'choices': [{'text': str(i)}]})}\n\n"
                        await asyncio.sleep(0.1)
                    yield "data: [DONE]\n\n"
                finally:
                    self.closed.append(time.perf_counter())

            if body.get("stream"):
                return StreamingResponse(chunks(), media_type="text/event-stream")
            return JSONResponse({"choices": [{"text": "ok"}], "usage": {"completion_tokens": 1}})

        async def models(request):
            return JSONResponse({"data": [{"id": "tiny"}]})

        app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models)])
        self.port = serve_procs.free_port()
        self.url, self.model_id = f"http://127.0.0.1:{self.port}", "tiny"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def slow(family_gguf, tmp_path_factory):
    up = FakeUpstream()
    tmp = tmp_path_factory.mktemp("gw-fake")
    kw = dict(max_concurrent=1, max_queue=1, request_timeout=1.5, max_tokens=MAX_TOKENS)
    gw = serve_procs.start_gateway(up, family_gguf("llama"), serve_procs.free_port(), tmp / "gateway.log", None, **kw)
    yield up, gw
    gw.stop()
    up.stop()


def test_full_queue_answers_429_with_retry_after_and_a_queued_request_times_out(slow):
    up, gw = slow
    body = {"model": "tiny", "prompt": "slow", "max_tokens": 4}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json={**body, "stream": True}, timeout=30) as held:
        lines = held.iter_lines()  # kept: a dropped iterator closes the response, which is a hang-up
        next(lines)  # A holds the one slot
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, f"{gw.url}/v1/completions", json=body, timeout=30)  # B waits in queue
            time.sleep(0.5)
            full = httpx.post(f"{gw.url}/v1/completions", json=body, timeout=10)  # C: no room
            assert_openai_error(full, 429, "queue_full")
            assert int(full.headers["retry-after"]) >= 1
            assert_openai_error(queued.result(), 504, "timeout")  # B: no slot within request_timeout (1.5 s)
        hung_up = time.perf_counter()
    time.sleep(0.5)
    assert up.closed and up.closed[-1] - hung_up < 0.5  # A hung up: the upstream stream was closed at once
    assert httpx.post(f"{gw.url}/v1/completions", json={**body, "prompt": "hi"}, timeout=10).status_code == 200
    log = gw.log.read_text()
    assert "status=429" in log and "status=504" in log and "disconnected=true" in log


def test_upstream_failures_become_502_and_openai_shaped_4xx(slow):
    up, gw = slow
    post = lambda prompt: httpx.post(f"{gw.url}/v1/completions", json={"model": "tiny", "prompt": prompt}, timeout=10)  # noqa: E731
    assert "kaputt" in assert_openai_error(post("boom"), 502, "upstream_error")["message"]
    assert_openai_error(post("detail"), 400, "upstream_error")  # llama_cpp.server's 422 {"detail"} -> 400
    up.stop()  # the upstream is gone
    assert_openai_error(post("hi"), 502, "upstream_error")
    assert_openai_error(httpx.get(f"{gw.url}/health", timeout=5), 502)


# ---- the gateway's own OpenAPI spec, fuzzed --------------------------------------------------------------


def test_schemathesis_finds_no_5xx_and_no_undocumented_status(llama):
    """Positive cases for every operation, negative ones for the POSTs (79 in all): no 5xx, every status documented."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import status_code_conformance

    schema = schemathesis.openapi.from_url(f"{llama.url}/openapi.json")
    spec = httpx.get(f"{llama.url}/openapi.json", timeout=5).json()
    assert spec["components"]["schemas"]["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 16
    statuses = {c for p in spec["paths"].values() for op in p.values() for c in op["responses"]}
    assert statuses >= {"200", "400", "401", "404", "413", "429", "502", "504"}
    seen: list[int] = []

    def with_our_model(case):  # most generated cases name the served model, so they reach the backend
        if isinstance(case.body, dict) and "model" in case.body and hash(json.dumps(case.body, default=str)) % 4:
            case.body["model"] = "tiny"
        return case

    for result in schema.get_all_operations():
        op = result.ok()
        post, modes = op.method.upper() == "POST", list(schemathesis.GenerationMode)
        for mode in modes if post else modes[:1]:  # a GET without parameters has no negative case
            n = (20 if mode.is_positive else 15) if post else 3

            @given(case=op.as_strategy(generation_mode=mode).map(with_our_model))
            @settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            def fuzz(case):
                resp = case.call_and_validate(headers=AUTH, checks=[not_a_server_error, status_code_conformance])
                seen.append(resp.status_code)

            fuzz()
    print(f"schemathesis: {len(seen)} calls, statuses {sorted(set(seen))}")
    assert 60 <= len(seen) <= 100 and 200 in seen and 400 in seen


# ---- transformers serve with continuous batching: concurrency through the gateway ---------------------------


def test_eight_streams_generate_at_once_through_the_gateway(family_model, tmp_path):
    model = family_model("llama")
    port = serve_procs.free_port()
    serve_procs.transformers_model_dir(model, tmp_path, "tiny")
    argv = serve_procs.transformers_argv("tiny", port, device="cpu", kv_blocks=16, max_batch_tokens=256)
    backend = serve_procs.ServerProcess(argv, f"http://127.0.0.1:{port}", "tiny", tmp_path / "server.log")
    backend.start(180, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    gw = None
    try:
        serve_clients.warm_up(backend.url, "tiny")
        gw = serve_procs.start_gateway(backend, model, serve_procs.free_port(), tmp_path / "gateway.log", KEY,
                                       max_concurrent=8)  # fmt: skip
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about the kite"}],
                "max_tokens": 24, "stream": True}  # fmt: skip

        def one(_: int) -> tuple[float, float]:  # first and last content event of one stream
            with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
                assert r.status_code == 200
                times = [time.perf_counter() for line in r.iter_lines() if '"content"' in line]
            assert len(times) > 1
            return times[0], times[-1]

        with ThreadPoolExecutor(8) as pool:
            spans = list(pool.map(one, range(8)))
        # the most streams receiving tokens at one moment, seen from the clients
        generating = max(sum(a <= t <= b for a, b in spans) for t, _ in spans)
        # a stream's log line is written after its last byte reached the client: read the log once it stopped
        assert gw.stop() < 5
        gw = None
        lines = [ln for ln in (tmp_path / "gateway.log").read_text().splitlines()
                 if "POST /v1/chat/completions status=200" in ln]  # fmt: skip
        in_flight = [int(re.search(r"in_flight=(\d+)", ln).group(1)) for ln in lines]
        print(f"8 streams through the gateway: in_flight per request {in_flight}, {generating} generating at once")
        assert len(in_flight) == 8 and max(in_flight) > 1 and generating > 1, (in_flight, spans)
    finally:
        if gw is not None:
            assert gw.stop() < 5
        assert backend.stop() < 5
