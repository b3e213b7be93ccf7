"""An OpenAI-compatible HTTP API over a generation backend (FastAPI), and its runner.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with `stream: true` as server-sent events ending in `data: [DONE]`). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with a 4xx status: malformed JSON and bad
fields 400, unknown model 404, prompt + max_tokens over the context 400, bad API key 401.
The clients that test a server (`smoke_test`, `load_test`) are in serve_clients.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from skillbook.ml.serve_backends import Backend, Piece, Sampling

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse


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


def create_app(backend: Backend, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `backend` under the OpenAI API."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(title="Skillbook OpenAI-compatible server")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error_response(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
                )
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": backend.model_id, "backend": backend.name}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [_model_card(backend, created)]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        return _completion(backend, req)

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        return _chat(backend, req)

    return app


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error body with `status` (401 is an authentication error, every other 4xx a bad request)."""
    from fastapi.responses import JSONResponse

    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """A 400 naming each bad field (or saying the body is not JSON) instead of FastAPI's 422."""
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return _error_response(
            400,
            "request body is not valid JSON: " + "; ".join(e.get("ctx", {}).get("error", e["msg"]) for e in errs),
            code="invalid_json",
        )
    msgs = ["{}: {}".format(".".join(str(p) for p in e["loc"][1:]) or "body", e["msg"]) for e in errs]
    return _error_response(400, "invalid request: " + "; ".join(msgs), param=".".join(map(str, errs[0]["loc"][1:])))


def _model_card(backend: Backend, created: int) -> dict:
    return {
        "id": backend.model_id,
        "object": "model",
        "created": created,
        "owned_by": "skillbook",
        "max_model_len": backend.n_ctx,
    }


def _check(backend: Backend, req: _Common, prompt: str, default_max: int) -> tuple[Sampling, list[str], int]:
    """Sampling, stop strings and the prompt's token count for a request; APIError if it cannot be served."""
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
    sp = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed)
    return sp, [s for s in stops if s], n_prompt


def _stream(backend: Backend, prompt: str, sp: Sampling, stops: list[str]) -> Iterator[Piece]:
    return apply_stops(backend.generate(prompt, sp), stops)


def _finish(backend: Backend, prompt: str, sp: Sampling, stops: list[str]) -> tuple[str, str]:
    """The whole generated text and its finish reason."""
    text, reason = "", "length"
    for piece in _stream(backend, prompt, sp, stops):
        text += piece.text
        reason = piece.finish_reason or reason
    return text, reason


def _sse(chunks: Iterator[dict]) -> Iterator[str]:
    """Server-sent events, one per chunk, ending in `data: [DONE]`."""
    try:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as exc:  # noqa: BLE001 - the status line is already sent: report any failure in-band
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
    yield "data: [DONE]\n\n"


def _usage(backend: Backend, n_prompt: int, text: str) -> dict:
    n_out = backend.count_tokens(text) if text else 0
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _completion(backend: Backend, req: CompletionRequest) -> dict | StreamingResponse:
    """POST /v1/completions: the text after `prompt`, whole or streamed."""
    from fastapi.responses import StreamingResponse

    sp, stops, n_prompt = _check(backend, req, req.prompt, 16)
    rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": now, "model": backend.model_id}
    if req.stream:
        chunks = (
            {**base, "choices": [{"index": 0, "text": p.text, "logprobs": None, "finish_reason": p.finish_reason}]}
            for p in _stream(backend, req.prompt, sp, stops)
        )
        return StreamingResponse(_sse(chunks), media_type="text/event-stream")
    text, reason = _finish(backend, req.prompt, sp, stops)
    return {
        **base,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        "usage": _usage(backend, n_prompt, text),
    }


def _chat(backend: Backend, req: ChatRequest) -> dict | StreamingResponse:
    """POST /v1/chat/completions: the assistant's reply to `messages` (rendered with the chat template)."""
    from fastapi.responses import StreamingResponse

    prompt = backend.chat_prompt([{"role": m.role, "content": m.content} for m in req.messages])
    sp, stops, n_prompt = _check(backend, req, prompt, 256)
    rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": backend.model_id}

        def chunks() -> Iterator[dict]:
            yield {
                **base,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            }
            for p in _stream(backend, prompt, sp, stops):
                delta = {"content": p.text} if p.text else {}
                yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": p.finish_reason}]}

        return StreamingResponse(_sse(chunks()), media_type="text/event-stream")
    text, reason = _finish(backend, prompt, sp, stops)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now,
        "model": backend.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
        "usage": _usage(backend, n_prompt, text),
    }


# ---------------------------------------------------------------------------------------------
# Running it: uvicorn in a background thread, so the caller can wait for health and stop it
# ---------------------------------------------------------------------------------------------


class ServerThread:
    """uvicorn serving `app` on host:port in a daemon thread; `stop()` shuts it down gracefully."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
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


def wait_healthy(url: str, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
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
