"""A guard in front of an OpenAI-compatible server: a small Starlette app that classifies each request with
a safety classifier and answers a flagged one with a refusal instead of calling the model.

POST /v1/completions and /v1/chat/completions: the guard reads the prompt (completions) or the last user
message (chat); P(disallowed) >= threshold -> an OpenAI-shaped refusal (streamed as one chunk when the
client asked for a stream), else the request goes to the backend unchanged and its answer (or stream)
comes back byte for byte. With `check_output` a non-streamed answer is classified too and replaced by the
refusal when flagged. Every other path (GET /v1/models, ...) is forwarded as is. With `api_key` the proxy
checks the bearer token itself, so a flagged request never bypasses the backend's authentication.

Run it with `python -m skillbook.ml.guard_proxy --backend URL --guard DIR --port N` (uvicorn), or from the
serving recipe (`--set guard=DIR`), which starts it as a subprocess next to the backend (`start_proxy`).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from skillbook.ml.guard import BLOCKED_PROBE, REFUSAL, prompt_for

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length"}


def request_text(path: str, body: dict) -> str:
    """The text the guard classifies: the prompt of a completion, the last user message of a chat."""
    if path.endswith("/chat/completions"):
        users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        content = users[-1].get("content", "") if users else ""
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    prompt = body.get("prompt", "")
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


def refusal_body(path: str, model: str, stream: bool) -> dict:
    """An OpenAI-shaped answer carrying the refusal (a chunk object when streaming)."""
    base = {"id": f"guard-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": model}
    if path.endswith("/chat/completions"):
        if stream:
            delta = {"role": "assistant", "content": REFUSAL}
            choice = {"index": 0, "delta": delta, "finish_reason": "stop"}
            return {**base, "object": "chat.completion.chunk", "choices": [choice]}
        choice = {"index": 0, "message": {"role": "assistant", "content": REFUSAL}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": REFUSAL, "finish_reason": "stop", "logprobs": None}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {**base, "object": "text_completion", "choices": [choice], **({} if stream else {"usage": usage})}


class Guard:
    """The classifier, loaded once: `score(text)` = P(disallowed)."""

    def __init__(self, guard_dir: str | Path, threshold: float | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(1)
        self.tok = AutoTokenizer.from_pretrained(str(guard_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(guard_dir)).eval()
        # the guardrails recipe stores the threshold it measured with in config.json (guard_threshold)
        self.threshold = threshold if threshold is not None else getattr(self.model.config, "guard_threshold", 0.5)

    def score(self, text: str) -> float:
        from skillbook.ml.guard import guard_scores

        return guard_scores(self.model, self.tok, [text])[0]


def build_app(backend: str, guard: Guard, check_output: bool = False, api_key: str | None = None):
    """The Starlette app: guarded POST endpoints, everything else forwarded to `backend`.

    Long: the handlers share the guard, the HTTP client and the key check as closures."""
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=backend.rstrip("/"), timeout=httpx.Timeout(300.0, connect=10.0))
    stats = {"requests": 0, "blocked": 0, "outputs_blocked": 0}

    def headers_in(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}

    async def forward(request: Request, body: bytes) -> Response:
        req = client.build_request(
            request.method, request.url.path, params=request.query_params, content=body, headers=headers_in(request)
        )
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as exc:  # the backend is down or hung: say so, as a gateway does
            return JSONResponse({"error": {"message": f"backend: {exc!r}", "type": "bad_gateway"}}, 502)
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            resp.aiter_raw(), status_code=resp.status_code, headers=headers, background=BackgroundTask(resp.aclose)
        )

    async def guarded(request: Request) -> Response:
        sent = request.headers.get("authorization", "").encode()
        if api_key and not hmac.compare_digest(sent, f"Bearer {api_key}".encode()):  # constant time
            return JSONResponse({"error": {"message": "invalid api key", "type": "authentication_error"}}, 401)
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return await forward(request, raw)  # the backend reports the bad JSON in its own words
        path, stream = request.url.path, bool(body.get("stream"))
        stats["requests"] += 1
        score = await run_in_threadpool(guard.score, request_text(path, body))
        if score >= guard.threshold:
            stats["blocked"] += 1
            answer = refusal_body(path, str(body.get("model", "")), stream)
            if not stream:
                return JSONResponse(answer, headers={"x-guard-score": f"{score:.4f}"})
            events = f"data: {json.dumps(answer)}\n\ndata: [DONE]\n\n"
            return Response(events, media_type="text/event-stream", headers={"x-guard-score": f"{score:.4f}"})
        if not check_output or stream:
            return await forward(request, raw)
        try:
            resp = await client.post(path, content=raw, headers=headers_in(request))
        except httpx.HTTPError as exc:
            return JSONResponse({"error": {"message": f"backend: {exc!r}", "type": "bad_gateway"}}, 502)
        if resp.status_code != 200:
            return Response(resp.content, resp.status_code, media_type=resp.headers.get("content-type"))
        answer = resp.json()
        for choice in answer.get("choices", []):
            text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
            if text and await run_in_threadpool(guard.score, text) >= guard.threshold:
                stats["outputs_blocked"] += 1
                choice.update(
                    {"text": REFUSAL} if "text" in choice else {"message": {"role": "assistant", "content": REFUSAL}}
                )
        return JSONResponse(answer)

    async def passthrough(request: Request) -> Response:
        return await forward(request, await request.body())

    async def guard_stats(request: Request) -> Response:
        return JSONResponse({**stats, "threshold": guard.threshold})

    routes = [
        Route("/v1/completions", guarded, methods=["POST"]),
        Route("/v1/chat/completions", guarded, methods=["POST"]),
        Route("/guard/stats", guard_stats, methods=["GET"]),
        Route("/{path:path}", passthrough, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def proxy_argv(
    backend: str,
    guard_dir: str | Path,
    port: int,
    host: str = "127.0.0.1",
    threshold: float | None = None,
    check_output: bool = False,
    api_key: str | None = None,
) -> list[str]:
    """`python -m skillbook.ml.guard_proxy ...`: the proxy as a subprocess (a ServerProcess starts and stops it)."""
    argv = [sys.executable, "-m", "skillbook.ml.guard_proxy", "--backend", backend, "--guard", str(guard_dir)]
    argv += ["--host", host, "--port", str(port)] + (["--threshold", str(threshold)] if threshold is not None else [])
    return argv + (["--check-output"] if check_output else []) + (["--api-key", api_key] if api_key else [])


def start_proxy(
    backend_url: str, model_id: str, guard_dir: str | Path, port: int, log: Path, timeout: float = 120, **kwargs: Any
):
    """Start the proxy in front of a running backend; ready when it lists the backend's model through itself."""
    from skillbook.ml.serve_procs import ServerProcess

    host = kwargs.get("host", "127.0.0.1")
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}".replace("0.0.0.0", "127.0.0.1")
    server = ServerProcess(
        proxy_argv(backend_url, guard_dir, port, **kwargs), url, model_id, log, kwargs.get("api_key")
    )
    server.start(timeout, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return server


def probe(url: str, api_key: str | None = None, prompt: str = BLOCKED_PROBE) -> dict:
    """A disallowed request through the guarded server, as a completion, a chat and a streamed chat, with the
    official openai client: each must come back as the refusal; plus the proxy's counters."""
    from openai import OpenAI

    from skillbook.ml.serve_procs import get_json

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", timeout=60.0, max_retries=0)
    model = client.models.list().data[0].id
    comp = client.completions.create(model=model, prompt=prompt_for(prompt), max_tokens=8, temperature=0)
    messages: Any = [{"role": "user", "content": prompt}]  # the openai client's TypedDicts, as plain dicts
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    stream: Any = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    texts = {"completion": comp.choices[0].text, "chat": chat.choices[0].message.content or "", "stream": streamed}
    return {
        "prompt": prompt,
        **texts,
        "blocked": all(t == REFUSAL for t in texts.values()),
        "stats": get_json(f"{url}/guard/stats", api_key)[1],
    }


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m skillbook.ml.guard_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, help="URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--guard", required=True, help="The guard classifier dir (AutoModelForSequenceClassification)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument(
        "--threshold", type=float, default=None, help="Refuse at P(disallowed) >= this (default: the guard's)"
    )
    ap.add_argument("--check-output", action="store_true", help="Classify non-streamed answers too")
    ap.add_argument("--api-key", default=None, help="Bearer token the proxy requires on the guarded endpoints")
    args = ap.parse_args(argv)
    app = build_app(args.backend, Guard(args.guard, args.threshold), args.check_output, args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
