"""The serving gateway: one Starlette app in front of the upstream server, fixing what the upstreams get wrong.

llama_cpp.server compares the API key with `!=`, answers 401/404/405/bad UTF-8 with `{"detail": ...}`, 500s
on a chat role its template rejects and documents only 200/422; transformers serve has no key. The serving
recipe always starts this in front: it validates every request before the upstream sees it (UTF-8, JSON,
bounded schemas, model id, the model's chat template in a jinja2 sandbox, the context) and answers every
error in OpenAI's shape; checks the key in constant time; bounds in-flight requests (`max_concurrent`), the
queue (`max_queue`, full -> 429 + Retry-After) and time (`request_timeout` -> 504), maps upstream 5xx to 502;
closes the upstream stream the moment a client hangs up; logs a line per request; serves its own OpenAPI
spec listing every status it sends; runs an optional request hook (guard_proxy.GuardHook). The key comes
from $SKILLBOOK_API_KEY so that it never shows in `ps` (serve_procs.gateway_argv builds the command line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from skillbook.ml.serve_clients import CHAT, COMPLETIONS, request_models
from skillbook.ml.serve_procs import ModelInfo, get_json

KEY_ENV = "SKILLBOOK_API_KEY"
log = logging.getLogger("skillbook.gateway")
STATUS = {  # status -> (OpenAI error type, what the spec says about it)
    400: ("invalid_request_error", "Invalid request; the message and `param` name the field"),
    401: ("authentication_error", "Missing or wrong bearer token"),
    404: ("invalid_request_error", "Unknown model (`model_not_found`) or path"),
    405: ("invalid_request_error", "Method not allowed on this path"),
    413: ("invalid_request_error", "Request body too large"),
    429: ("rate_limit_error", "Queue full: retry after Retry-After seconds"),
    502: ("upstream_error", "The upstream server failed or is unreachable"),
    504: ("timeout_error", "Not answered within the gateway's request timeout"),
}


class Refused(Exception):
    """A request the gateway answers itself with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self):
        from starlette.responses import JSONResponse

        err = {"message": self.message, "type": STATUS[self.status][0], "param": self.param, "code": self.code}
        return JSONResponse({"error": err}, self.status, headers=self.headers)


# ---- the spec: the request models (serve_clients.request_models) write its schemas, so the two cannot drift ---


ERROR_FIELDS = {"message": "string", "type": "string", "param": ["string", "null"], "code": ["string", "null"]}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": list(
    ERROR_FIELDS), "properties": {k: {"type": t} for k, t in ERROR_FIELDS.items()}}}}  # fmt: skip


def openapi_spec(model_id: str, models: dict[str, type[BaseModel]], auth: bool, hook: bool = False) -> dict:
    """The gateway's own OpenAPI 3.1 document: every route, its request schema, every status it can send."""
    schemas: dict[str, Any] = {"Error": ERROR}
    for m in models.values():
        s = m.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}), **{m.__name__: s})
    ok = {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}

    def op(summary: str, *codes: int, body: str | None = None, secured: bool = False) -> dict:
        err = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        codes += (401,) if secured and auth else ()
        res = {"200": {"description": "OK", "content": ok}} | {
            str(c): {"description": STATUS[c][1], "content": err} for c in sorted(codes)
        }
        if 429 in codes:
            res["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
        out: dict[str, Any] = {"summary": summary, "responses": res}
        if body:
            ref = {"schema": {"$ref": f"#/components/schemas/{body}"}}
            out["requestBody"] = {"required": True, "content": {"application/json": ref}}
        return out | ({"security": [{"bearer": []}]} if secured and auth else {})

    gen = (400, 404, 413, 429, 502, 504)
    paths = {
        "/health": {"get": op("Liveness; queue and in-flight counts", 502)},
        "/openapi.json": {"get": op("This document")},
        "/v1/models": {"get": op("The served model", secured=True)},
        COMPLETIONS: {"post": op("Text completion (one prompt)", *gen, body="CompletionRequest", secured=True)},
        CHAT: {"post": op("Chat, checked with the model's template", *gen, body="ChatCompletionRequest", secured=True)},
    } | ({"/guard/stats": {"get": op("The request hook's counters")}} if hook else {})
    components: dict[str, Any] = {"schemas": schemas}
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    info = {"title": f"skillbook gateway: {model_id}", "version": "1",
            "description": "Any other path answers 404 and a wrong method 405, both in the Error shape."}  # fmt: skip
    return {"openapi": "3.1.0", "info": info, "paths": paths, "components": components}


def checked_body(models: dict, info: ModelInfo, model_id: str, cap: int, path: str, raw: bytes) -> tuple[dict, str]:
    """The body to forward upstream and the prompt text it generates from, or Refused(400/404)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") would crash llama.cpp
    except UnicodeError as exc:
        raise Refused(
            400, f"the body is not valid UTF-8 (or holds a lone surrogate): {exc}", code="invalid_encoding"
        ) from None
    except ValueError as exc:
        raise Refused(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise Refused(400, f"the body must be a JSON object, not {type(obj).__name__}", code="invalid_type")
    try:
        req = models[path].model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise Refused(400, f"{where}: {first['msg']}", param=where, code="invalid_value") from None
    if req.model != model_id:
        raise Refused(404, f"model {req.model!r} does not exist; this server serves {model_id!r}", "model",
                      "model_not_found")  # fmt: skip
    body = {k: v for k, v in req.model_dump().items() if v is not None and k != "max_completion_tokens"}
    param = "messages" if path == CHAT else "prompt"
    if path == CHAT:
        for m in body["messages"]:  # text parts -> one string: every upstream and template takes a string
            if isinstance(m["content"], list):
                m["content"] = "".join(p["text"] for p in m["content"])
        if info.template is None and info.count is not None:
            raise Refused(400, "messages: the model has no chat template; use /v1/completions", param)
        try:
            text = info.render(body["messages"]) if info.template else ""
        except Exception as exc:  # noqa: BLE001 - a template is arbitrary code: whatever fails is the request's
            raise Refused(400, f"messages: the chat template rejects them: {exc}", param, "invalid_chat") from None
    else:
        body["prompt"] = text = body["prompt"][0] if isinstance(body["prompt"], list) else body["prompt"]
    wanted = getattr(req, "max_completion_tokens", None) or req.max_tokens
    n = info.count(text) if info.count else 0
    if n + (wanted or 1) > info.n_ctx:
        raise Refused(400, f"the prompt ({n} tokens) + max_tokens ({wanted or 1}) exceed the context of "
                      f"{info.n_ctx} tokens", param, "context_length_exceeded")  # fmt: skip
    body["max_tokens"] = wanted or min(cap, info.n_ctx - n)  # absent: up to the cap, within the context
    return body, text


# ---- the app ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    backend: str  # the upstream server's URL
    model_id: str
    info: ModelInfo = field(default_factory=lambda: ModelInfo(None))
    api_key: str | None = None  # clients must send it; the gateway sends it upstream too (llama-cpp, vllm)
    max_tokens: int | None = None  # the largest max_tokens accepted; None = the context
    max_concurrent: int = 1
    max_queue: int = 16
    request_timeout: float = 300.0
    max_body_bytes: int = 1 << 20


def upstream_message(content: bytes) -> str:
    """The upstream's error text, whatever its shape ({"error": {"message"}}, {"detail"}, plain text)."""
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:500]
    err = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    return str(err.get("message", err) if isinstance(err, dict) else err)[:500]


def build_app(s: Settings, hook: Any = None):
    """The Starlette app. `hook`: `.request(path, body) -> (refusal, score) | None`, `.answer(dict) -> dict`,
    `.check_output`, `.stats` (guard_proxy.GuardHook). Long: the handlers share the client, slots and counters."""
    import anyio
    import httpx
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    cap = s.max_tokens or s.info.n_ctx
    models = request_models(cap, prompt_chars=max(1024, 8 * s.info.n_ctx))
    spec = openapi_spec(s.model_id, models, bool(s.api_key), hook is not None)
    client = httpx.AsyncClient(base_url=s.backend.rstrip("/"), timeout=httpx.Timeout(s.request_timeout, connect=5))
    up_headers = {"authorization": f"Bearer {s.api_key}"} if s.api_key else {}
    slots = asyncio.Semaphore(s.max_concurrent)
    state: dict[str, Any] = {"queued": 0, "in_flight": 0, "avg_s": 1.0}  # avg_s: running mean, for Retry-After

    def check_key(request: Request) -> None:
        sent = request.headers.get("authorization", "").encode()
        if s.api_key and not hmac.compare_digest(sent, f"Bearer {s.api_key}".encode()):  # constant time
            raise Refused(401, "invalid api key: send Authorization: Bearer <key>", code="invalid_api_key")

    def log_line(request: Request, status: int, t0: float, stream: bool, queue: int, in_flight: int, **kw) -> None:
        extra = "".join(f" {k}={v}" for k, v in kw.items())
        log.info(f"{request.method} {request.url.path} status={status} ms={1000 * (time.perf_counter() - t0):.1f} "
                 f"streamed={str(stream).lower()} queue={queue} in_flight={in_flight}{extra}")  # fmt: skip

    async def generate(request: Request) -> Response:
        t0, path, stream = time.perf_counter(), request.url.path, False
        try:
            check_key(request)
            declared = int(request.headers.get("content-length") or 0)  # or chunked: then counted as it came
            if declared > s.max_body_bytes or len(raw := await request.body()) > s.max_body_bytes:
                raise Refused(413, f"the body exceeds {s.max_body_bytes} bytes", code="request_too_large")
            body, _ = checked_body(models, s.info, s.model_id, cap, path, raw)
            stream = bool(body.get("stream"))
            if hook is not None and (refusal := await run_in_threadpool(hook.request, path, body)):
                log_line(request, 200, t0, stream, state["queued"], state["in_flight"], refused="true")
                return refusal
            if slots.locked() and state["queued"] >= s.max_queue:  # a slot, a place in the queue, or 429
                wait = max(1, math.ceil(state["avg_s"] * (state["queued"] + 1) / s.max_concurrent))
                raise Refused(429, f"{state['queued']} requests queued (max_queue {s.max_queue}); retry in {wait} s",
                              code="queue_full", headers={"Retry-After": str(wait)})  # fmt: skip
        except Refused as r:
            log_line(request, r.status, t0, stream, state["queued"], state["in_flight"])
            return r.response()
        return await admitted(request, body, stream, t0)

    async def admitted(request: Request, body: dict, stream: bool, t0: float) -> Response:
        deadline, queue = time.monotonic() + s.request_timeout, state["queued"]
        state["queued"] += 1
        try:
            await asyncio.wait_for(slots.acquire(), s.request_timeout)
        except TimeoutError:
            log_line(request, 504, t0, stream, queue, state["in_flight"])
            raise Refused(504, f"no upstream slot within {s.request_timeout} s", code="timeout") from None
        finally:
            state["queued"] -= 1
        state["in_flight"] += 1
        in_flight, released, finished = state["in_flight"], False, False

        def release(status: int, **kw: Any) -> None:
            nonlocal released
            if not released:
                released = True
                state["in_flight"] -= 1
                slots.release()
                state["avg_s"] = 0.8 * state["avg_s"] + 0.2 * (time.perf_counter() - t0)
                log_line(request, status, t0, stream, queue, in_flight, **kw)

        resp = None
        try:  # on any error: release the slot, close the upstream response, answer in OpenAI's shape
            if await request.is_disconnected():  # gave up while queued: generate nothing for nobody
                release(499, disconnected="true")
                raise Refused(400, "the client closed the request while queued", code="client_closed")
            req = client.build_request("POST", request.url.path, json=body, headers=up_headers)
            resp = await asyncio.wait_for(client.send(req, stream=True), deadline - time.monotonic())
            if resp.status_code >= 400:  # the upstream's error, in OpenAI's shape, with a documented status
                message, code = upstream_message(await resp.aread()), resp.status_code
                release(status := 502 if code >= 500 else code if code in STATUS else 400, upstream=code)
                raise Refused(status, f"upstream {code}: {message}", code="upstream_error")
            if not stream:
                content = await asyncio.wait_for(resp.aread(), deadline - time.monotonic())
                release(200)
                if hook is not None and hook.check_output:
                    return JSONResponse(await run_in_threadpool(hook.answer, json.loads(content)))
                return Response(content, 200, media_type="application/json")
        except TimeoutError:
            release(504)
            raise Refused(504, f"no upstream answer within {s.request_timeout} s", code="timeout") from None
        except httpx.HTTPError as exc:
            release(502)
            raise Refused(502, f"upstream unreachable: {type(exc).__name__}: {exc}", code="upstream_error") from None
        finally:
            if resp is not None and (not stream or released):
                with anyio.CancelScope(shield=True):
                    await resp.aclose()
        upstream = resp

        async def events():
            nonlocal finished
            chunks = upstream.aiter_raw()
            try:
                while True:
                    try:
                        yield await asyncio.wait_for(anext(chunks), s.request_timeout)  # a gap, not the total
                    except StopAsyncIteration:
                        finished = True
                        return
            except (TimeoutError, httpx.HTTPError) as exc:  # headers are out: end the stream with an error event
                what = "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                err = {"message": f"upstream stream ended: {what}", "type": "upstream_error", "param": None}
                yield f"data: {json.dumps({'error': err | {'code': 'upstream_error'}})}\n\ndata: [DONE]\n\n".encode()

        class Forwarded(StreamingResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:  # finished or the client hung up: close upstream now, so the backend stops generating
                    with anyio.CancelScope(shield=True):
                        await upstream.aclose()
                        release(200, disconnected=str(not finished).lower())

        return Forwarded(events(), 200, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def models_list(request: Request) -> Response:
        check_key(request)
        card = {"id": s.model_id, "object": "model", "created": 0, "owned_by": "skillbook"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        try:
            await client.get("/v1/models", headers=up_headers, timeout=2)
        except httpx.HTTPError as exc:
            raise Refused(502, f"upstream unreachable: {type(exc).__name__}", code="upstream_error") from None
        return JSONResponse({"status": "ok", "queued": state["queued"], "in_flight": state["in_flight"]})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 400)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        text = message.get(status, str(getattr(exc, "detail", exc)))
        return Refused(status if status in STATUS else 400, text, headers=getattr(exc, "headers", None)).response()

    routes = [
        Route(COMPLETIONS, generate, methods=["POST"]),
        Route(CHAT, generate, methods=["POST"]),
        Route("/v1/models", models_list, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", lambda request: JSONResponse(spec), methods=["GET"]),
    ]
    if hook is not None:
        routes.append(Route("/guard/stats", lambda r: JSONResponse({**hook.stats, "threshold": hook.threshold})))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    handlers = {HTTPException: http_error, Refused: lambda request, exc: exc.response()}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m skillbook.ml.gateway", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, help="URL of the upstream OpenAI-compatible server")
    ap.add_argument("--model-id", default=None, help="The model name clients send (default: the upstream's first)")
    ap.add_argument("--chat-template-from", default=None, help="The .gguf file or hf-model dir being served")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--n-ctx", type=int, default=0, help="Context in tokens (0 = the model's)")
    ap.add_argument("--max-tokens", type=int, default=None, help="Largest max_tokens accepted (default: n_ctx)")
    ap.add_argument("--max-concurrent", type=int, default=1, help="Requests in flight upstream at once")
    ap.add_argument("--max-queue", type=int, default=16, help="Requests waiting for a slot; more get 429")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="Seconds per request, queueing included")
    ap.add_argument("--guard", default=None, help="A guard classifier dir (guardrails skill): refuse what it flags")
    ap.add_argument("--guard-threshold", "--threshold", type=float, default=None, help="Default: the guard's own")
    ap.add_argument("--check-output", action="store_true", help="With --guard: classify non-streamed answers too")
    ap.add_argument("--api-key", default=None, help=f"Bearer token clients must send (better: ${KEY_ENV})")
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s gateway %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is ours, not one per hop
    key = args.api_key or os.environ.get(KEY_ENV) or None
    model_id = args.model_id
    if model_id is None:  # by hand, without --model-id: ask the upstream which model it serves
        model_id = get_json(f"{args.backend.rstrip('/')}/v1/models", key, timeout=10)[1]["data"][0]["id"]
    hook = None
    if args.guard:
        from skillbook.ml.guard_proxy import Guard, GuardHook

        hook = GuardHook(Guard(args.guard, args.guard_threshold), args.check_output)
    info = ModelInfo.load(args.chat_template_from, args.n_ctx)
    settings = Settings(args.backend, model_id, info, key, args.max_tokens, args.max_concurrent, args.max_queue,
                        args.request_timeout)  # fmt: skip
    log.info(f"model {model_id}: n_ctx {info.n_ctx}, chat template {'yes' if info.template else 'no'}, "
             f"max_concurrent {args.max_concurrent}, max_queue {args.max_queue}")  # fmt: skip
    uvicorn.run(build_app(settings, hook), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
