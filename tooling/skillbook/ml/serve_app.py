"""An OpenAI-compatible HTTP API over a generation backend (FastAPI), its runner, and two clients.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with `stream: true` as server-sent events ending in `data: [DONE]`). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with a 4xx status: malformed JSON and bad
fields 400, unknown model 404, prompt + max_tokens over the context 400, bad API key 401.
The clients (`smoke_test`, `load_test`) use the official `openai` package, so they also work
against `vllm serve` or llama.cpp's server.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from skillbook.ml.serve_backends import Backend, Piece, Sampling


class APIError(Exception):
    """An error the API reports to the client with a status code and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we ignore (user, stream_options …)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Common):
    prompt: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------------------------------------
# Stop strings: applied here, once, for every backend
# ---------------------------------------------------------------------------------------------


def apply_stops(pieces: Iterator[Piece], stops: list[str]) -> Iterator[Piece]:
    """Yield text until a stop string appears; hold back a tail that could be the start of one."""
    if not stops:
        yield from pieces
        return
    hold = max(len(s) for s in stops) - 1
    buf = ""
    for piece in pieces:
        buf += piece.text
        hits = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if hits:
            if hasattr(pieces, "close"):
                pieces.close()  # stops the backend's generation now, not after max_tokens
            yield Piece(buf[: min(hits)], "stop")
            return
        if piece.finish_reason:
            yield Piece(buf, piece.finish_reason)
            return
        cut = max(0, len(buf) - hold)
        if cut:
            yield Piece(buf[:cut])
            buf = buf[cut:]
    yield Piece(buf, "stop")  # the backend ended without a finish reason


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(backend: Backend, api_key: str | None = None):
    """The FastAPI app serving `backend` under the OpenAI API."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="Skillbook OpenAI-compatible server")
    created = int(time.time())

    def error_body(status: int, message: str, param=None, code=None) -> JSONResponse:
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_body(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error_body(
                400,
                "request body is not valid JSON: " + "; ".join(e.get("ctx", {}).get("error", e["msg"]) for e in errs),
                code="invalid_json",
            )
        msgs = ["{}: {}".format(".".join(str(p) for p in e["loc"][1:]) or "body", e["msg"]) for e in errs]
        return error_body(400, "invalid request: " + "; ".join(msgs), param=".".join(map(str, errs[0]["loc"][1:])))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_body(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
                )
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": backend.model_id, "backend": backend.name}

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": backend.model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "skillbook",
                    "max_model_len": backend.n_ctx,
                }
            ],
        }

    def check(req: _Common, prompt: str, default_max: int) -> tuple[Sampling, list[str], int]:
        if req.model != backend.model_id:
            raise APIError(
                404,
                f"model '{req.model}' does not exist; this server serves '{backend.model_id}' (see GET /v1/models)",
                "model",
                "model_not_found",
            )
        n_prompt = backend.count_tokens(prompt)
        room = backend.n_ctx - n_prompt
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or min(default_max, max(room, 1))
        if n_prompt + max_tokens > backend.n_ctx:
            raise APIError(
                400,
                f"this model's maximum context length is {backend.n_ctx} tokens; the prompt has "
                f"{n_prompt} tokens and max_tokens is {max_tokens} ({n_prompt + max_tokens} in total): "
                f"shorten the prompt or lower max_tokens",
                "messages" if hasattr(req, "messages") else "prompt",
                "context_length_exceeded",
            )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sp = Sampling(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed
        )
        return sp, [s for s in stops if s], n_prompt

    def run_stream(prompt: str, sp: Sampling, stops: list[str]) -> Iterator[Piece]:
        return apply_stops(backend.generate(prompt, sp), stops)

    def sse(chunks: Iterator[dict]) -> Iterator[str]:
        try:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as exc:  # the status line is already sent: report the failure in-band
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    def finish(prompt: str, sp: Sampling, stops: list[str]) -> tuple[str, str]:
        text, reason = "", "length"
        for piece in run_stream(prompt, sp, stops):
            text += piece.text
            reason = piece.finish_reason or reason
        return text, reason

    def usage(n_prompt: int, text: str) -> dict:
        n_out = backend.count_tokens(text) if text else 0
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        sp, stops, n_prompt = check(req, req.prompt, 16)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": backend.model_id}
        if req.stream:
            chunks = (
                {**base, "choices": [{"index": 0, "text": p.text, "logprobs": None, "finish_reason": p.finish_reason}]}
                for p in run_stream(req.prompt, sp, stops)
            )
            return StreamingResponse(sse(chunks), media_type="text/event-stream")
        text, reason = finish(req.prompt, sp, stops)
        return {
            **base,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            "usage": usage(n_prompt, text),
        }

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        prompt = backend.chat_prompt([{"role": m.role, "content": m.content} for m in req.messages])
        sp, stops, n_prompt = check(req, prompt, 256)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": backend.model_id}

            def chunks() -> Iterator[dict]:
                yield {
                    **base,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
                for p in run_stream(prompt, sp, stops):
                    delta = {"content": p.text} if p.text else {}
                    yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": p.finish_reason}]}

            return StreamingResponse(sse(chunks()), media_type="text/event-stream")
        text, reason = finish(prompt, sp, stops)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": backend.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
            "usage": usage(n_prompt, text),
        }

    return app


# ---------------------------------------------------------------------------------------------
# Running it: uvicorn in a background thread, so the caller can wait for health and stop it
# ---------------------------------------------------------------------------------------------


class ServerThread:
    """uvicorn serving `app` on host:port in a daemon thread; `stop()` shuts it down gracefully."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
        import uvicorn

        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        wait_healthy(self.url, timeout, alive=self.thread.is_alive)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_healthy(url: str, timeout: float = 60.0, alive=lambda: True) -> None:
    """Poll GET {url}/health until it answers 200; raise if the server died or time ran out."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive():
            raise RuntimeError(f"the server at {url} exited before it became healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} did not answer /health within {timeout:.0f} s")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Clients: the smoke test and the load test (official openai package)
# ---------------------------------------------------------------------------------------------


def _client(url: str, api_key: str | None, timeout: float = 120.0):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", timeout=timeout, max_retries=0)


def smoke_test(
    url: str,
    prompt: str = "Question: What colour is Mira's kite?\nAnswer:",
    max_tokens: int = 16,
    api_key: str | None = None,
) -> dict:
    """List models, one completion, one chat, one streamed chat; latencies and texts in a dict."""
    client = _client(url, api_key)
    model = client.models.list().data[0].id
    out: dict = {"url": url, "model": model}
    t = time.perf_counter()
    comp = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, seed=0)
    out["completion"] = {
        "text": comp.choices[0].text,
        "finish_reason": comp.choices[0].finish_reason,
        "latency_s": time.perf_counter() - t,
        "completion_tokens": comp.usage.completion_tokens,
    }
    t = time.perf_counter()
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    out["chat"] = {"text": chat.choices[0].message.content, "latency_s": time.perf_counter() - t}
    t, first, parts = time.perf_counter(), None, []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t
            parts.append(chunk.choices[0].delta.content)
    out["stream"] = {
        "text": "".join(parts),
        "chunks": len(parts),
        "ttft_s": first,
        "latency_s": time.perf_counter() - t,
    }
    # greedy decoding: the streamed chat must equal the non-streamed one, token for token
    out["ok"] = bool(comp.usage.completion_tokens > 0 and out["stream"]["text"] == out["chat"]["text"])
    return out


def load_test(
    url: str,
    clients: int = 16,
    requests_per_client: int = 2,
    max_tokens: int = 16,
    prompt: str = "Question: What colour is Mira's kite?\nAnswer:",
    api_key: str | None = None,
) -> dict:
    """N concurrent clients, each sending completions in turn: p50/p95 latency, requests/s, tokens/s."""
    client = _client(url, api_key, timeout=300.0)
    model = client.models.list().data[0].id

    def one(i: int) -> list[tuple[float, int, str | None]]:
        rows = []
        for j in range(requests_per_client):
            t = time.perf_counter()
            try:
                r = client.completions.create(
                    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8, seed=i * 1000 + j
                )
                rows.append((time.perf_counter() - t, r.usage.completion_tokens, None))
            except Exception as exc:  # counted, not raised: the report says how many failed
                rows.append((time.perf_counter() - t, 0, f"{type(exc).__name__}: {exc}"))
        return rows

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        rows = [r for rs in pool.map(one, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in rows if r[2] is None)
    errors = [r[2] for r in rows if r[2] is not None]
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) >= 2 else lat * 19
    return {
        "clients": clients,
        "requests": len(rows),
        "succeeded": len(lat),
        "failed": len(errors),
        "errors": errors[:5],
        "wall_s": wall,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p95_s": q[18] if lat else None,
        "requests_per_s": len(lat) / wall,
        "generated_tokens_per_s": sum(r[1] for r in rows) / wall,
    }
