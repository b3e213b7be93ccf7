"""The guard as a hook of the serving gateway: a safety classifier scores each request, and a flagged one
gets an OpenAI-shaped refusal instead of reaching the model.

POST /v1/completions and /v1/chat/completions: the guard reads the prompt (completions) or the last user
message (chat); P(disallowed) >= threshold -> the refusal (streamed as one chunk when the client asked for
a stream), else the gateway forwards the request and its answer (or stream). With `check_output` a
non-streamed answer is classified too and replaced by the refusal when flagged. The proxy itself (auth,
validation, queueing, streaming) is skillbook.ml.gateway: there is one proxy, and this is its guard.

The serving recipe (`--set guard=DIR`) starts `python -m skillbook.ml.gateway ... --guard DIR`;
By hand: `python -m skillbook.ml.gateway --backend URL --guard DIR --port N`.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from skillbook.ml.guard import BLOCKED_PROBE, REFUSAL, prompt_for


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


class GuardHook:
    """The guard as the gateway's request hook (skillbook.ml.gateway.build_app(..., hook=GuardHook(guard))).

    `request` runs before a request is admitted: a flagged one gets the refusal and never reaches the model;
    `answer` (with `check_output`) replaces flagged non-streamed answers; `stats` is served at /guard/stats."""

    def __init__(self, guard: Guard, check_output: bool = False):
        self.guard, self.check_output, self.threshold = guard, check_output, guard.threshold
        self.stats = {"requests": 0, "blocked": 0, "outputs_blocked": 0}

    def request(self, path: str, body: dict):
        """The refusal (a starlette Response: JSON, or one SSE chunk + [DONE]) for a flagged request, else None."""
        from starlette.responses import JSONResponse, Response

        self.stats["requests"] += 1
        score = self.guard.score(request_text(path, body))
        if score < self.threshold:
            return None
        self.stats["blocked"] += 1
        answer, headers = (
            refusal_body(path, str(body.get("model", "")), bool(body.get("stream"))),
            {"x-guard-score": f"{score:.4f}"},
        )
        if not body.get("stream"):
            return JSONResponse(answer, headers=headers)
        return Response(
            f"data: {json.dumps(answer)}\n\ndata: [DONE]\n\n", media_type="text/event-stream", headers=headers
        )

    def answer(self, answer: dict) -> dict:
        for choice in answer.get("choices", []):
            text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
            if text and self.guard.score(text) >= self.threshold:
                self.stats["outputs_blocked"] += 1
                choice.update(
                    {"text": REFUSAL} if "text" in choice else {"message": {"role": "assistant", "content": REFUSAL}}
                )
        return answer


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
