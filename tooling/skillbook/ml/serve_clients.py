"""Clients for an OpenAI-compatible server: the request bodies it takes, a smoke test and a load test.

`request_models` are the OpenAI request bodies as pydantic models with a server's bounds: the gateway
(skillbook.ml.gateway) validates with them and writes its OpenAPI spec from them. The tests use the official
`openai` package, so they work against any OpenAI-compatible server: `vllm serve`, `transformers serve` or
`python -m llama_cpp.server` (skillbook.ml.serve_procs starts them), and the gateway in front.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def request_models(max_tokens: int, prompt_chars: int) -> dict[str, type[BaseModel]]:
    """path -> the request model with this server's bounds; strict (no "1" for 1) and closed (extra=forbid)."""
    strict = ConfigDict(extra="forbid", strict=True)
    Text = Annotated[str, StringConstraints(max_length=prompt_chars)]
    Stop = Annotated[str, StringConstraints(max_length=64)]
    MaxTokens = Annotated[int, Field(ge=1, le=max_tokens)]

    class Sampling(BaseModel):
        model_config = strict
        model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
        max_tokens: MaxTokens | None = None
        temperature: Annotated[float, Field(ge=0, le=2)] | None = None
        top_p: Annotated[float, Field(ge=0, le=1)] | None = None
        top_k: Annotated[int, Field(ge=0, le=1000)] | None = None
        presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
        frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
        stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
        seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
        n: Literal[1] | None = None
        stream: bool | None = None
        user: Annotated[str, StringConstraints(max_length=256)] | None = None

    class CompletionRequest(Sampling):
        prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]  # one prompt per request
        logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # top-N log-probs per token
        echo: bool | None = None  # with logprobs: the prompt's own log-probs (lm-eval's loglikelihood tasks)

    class TextPart(BaseModel):
        model_config = strict
        type: Literal["text"]
        text: Text

    class Message(BaseModel):
        model_config = strict
        role: Literal["system", "user", "assistant", "tool"]
        content: Text | Annotated[list[TextPart], Field(max_length=16)] | None

    class ChatCompletionRequest(Sampling):
        messages: Annotated[list[Message], Field(min_length=1, max_length=64)]
        max_completion_tokens: MaxTokens | None = None
        logprobs: bool | None = None
        top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    return {COMPLETIONS: CompletionRequest, CHAT: ChatCompletionRequest}


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

    # greedy decoding: the streamed chat must equal the non-streamed one, token for token, up to surrounding
    # whitespace (transformers serve's reply parser strips a whole reply, not a stream) and a multi-byte
    # character cut by max_tokens (a whole reply shows its bytes as U+FFFD, a stream holds them back)
    def norm(text: str | None) -> str:
        return (text or "").replace("\ufffd", "").strip()

    same = norm(out["stream"]["text"]) == norm(out["chat"]["text"])
    out["ok"] = bool(comp.usage.completion_tokens > 0 and same)
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
        rows: list[tuple[float, int, str | None]] = []
        for j in range(requests_per_client):
            t = time.perf_counter()
            try:
                r = client.completions.create(
                    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8, seed=i * 1000 + j
                )
                rows.append((time.perf_counter() - t, r.usage.completion_tokens, None))
            except Exception as exc:  # noqa: BLE001 - counted, not raised: the report says how many failed
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


def warm_up(url: str, model: str, api_key: str | None = None) -> float:
    """One greedy 1-token completion; returns its seconds. transformers serve sets up continuous batching
    (KV cache, and the sampling settings every later request shares) on its first request."""
    t = time.perf_counter()
    _client(url, api_key).completions.create(model=model, prompt="Hello", max_tokens=1, temperature=0)
    return time.perf_counter() - t


def hop_cost(direct_url: str, gateway_url: str, model: str, api_key: str | None = None, n: int = 20) -> dict:
    """What the gateway adds to a request: the median of `n` greedy 4-token completions sent straight to the
    backend and the same through the gateway, alternating so both see the same machine load (ms)."""
    clients = {"direct": _client(direct_url, api_key), "gateway": _client(gateway_url, api_key)}
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    for _ in range(n):
        for name, client in clients.items():
            t = time.perf_counter()
            client.completions.create(model=model, prompt="Mira", max_tokens=4, temperature=0)
            times[name].append(time.perf_counter() - t)
    direct, gateway = (1000 * statistics.median(times[k]) for k in ("direct", "gateway"))
    return {"requests": n, "direct_ms": direct, "gateway_ms": gateway, "overhead_ms": gateway - direct}
