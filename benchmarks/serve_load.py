"""Serving load test: N concurrent openai clients against the OpenAI-compatible server.

Starts the server for --model (a .gguf -> llama-cpp backend, an hf-model dir -> transformers) on a
free loopback port, or targets a running server with --url; prints JSON with p50/p95 latency,
requests/s and generated tokens/s. Usage:

    python benchmarks/serve_load.py --model model-Q8_0.gguf --clients 16 --requests 4
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 64   # e.g. a vllm serve
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("SKILLBOOK_MODEL"), help=".gguf file or hf-model directory")
    ap.add_argument("--url", help="benchmark an already running server instead of starting one")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, sent one after another")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the server")
    ap.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    args = ap.parse_args()

    from skillbook.ml import serve_app, serve_backends, serve_clients

    if args.url:
        result = serve_clients.load_test(args.url, args.clients, args.requests, args.max_tokens, api_key=args.api_key)
        result["backend"] = "external"
    else:
        if not args.model:
            ap.error("--model or --url is required (or set SKILLBOOK_MODEL)")
        path = Path(args.model)
        if path.suffix == ".gguf":
            backend = serve_backends.LlamaCppBackend(path, n_threads=args.threads)
        else:
            import torch

            torch.set_num_threads(args.threads)
            backend = serve_backends.TransformersBackend(path)
        with serve_app.ServerThread(serve_app.create_app(backend), port=serve_app.free_port()) as server:
            single = serve_clients.load_test(server.url, 1, 2, args.max_tokens)  # baseline: one client alone
            result = serve_clients.load_test(server.url, args.clients, args.requests, args.max_tokens)
        result["backend"] = backend.name
        result["single_client_latency_p50_s"] = single["latency_p50_s"]
        result["p50_latency_ratio_vs_single_client"] = result["latency_p50_s"] / single["latency_p50_s"]
    result["benchmark"] = "serve_load"
    print(json.dumps(result, indent=2))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
