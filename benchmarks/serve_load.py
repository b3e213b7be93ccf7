"""Serving load test: N concurrent openai clients against a maintained OpenAI-compatible server.

Starts the server the serving recipe would for --model (a .gguf -> `python -m llama_cpp.server`, an
hf-model dir -> `transformers serve --continuous-batching`) on a free loopback port, or targets a
running server with --url; prints JSON with p50/p95 latency, requests/s, generated tokens/s and the
p50 ratio to a single client alone (≈ clients for a server that runs one request at a time). Usage:

    python benchmarks/serve_load.py --model model-Q8_0.gguf --clients 16 --requests 4
    python benchmarks/serve_load.py --model runs/pretraining/latest/model --clients 16 --no-batching
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 64   # e.g. a vllm serve
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def start(path: Path, threads: int, batching: bool, tmp: Path):
    from skillbook.ml import serve_clients, serve_procs

    port, cwd, env = serve_procs.free_port(), None, {}
    if path.suffix == ".gguf":
        argv = serve_procs.llama_cpp_argv(path, port, model_id="bench", threads=threads)
    else:
        cwd = tmp
        serve_procs.transformers_model_dir(path, cwd, "bench")
        argv = serve_procs.transformers_argv(
            "bench", port, device="cpu", continuous_batching=batching, kv_blocks=16, max_batch_tokens=256
        )
        env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    server = serve_procs.ServerProcess(argv, f"http://127.0.0.1:{port}", "bench", tmp / "server.log")
    server.start(300, cwd=cwd, env=env)
    if path.suffix != ".gguf":
        serve_clients.warm_up(server.url, "bench")
    return server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("SKILLBOOK_MODEL"), help=".gguf file or hf-model directory")
    ap.add_argument("--url", help="benchmark an already running server instead of starting one")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, sent one after another")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of the server")
    ap.add_argument("--no-batching", action="store_true", help="transformers serve without continuous batching")
    ap.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    args = ap.parse_args()

    from skillbook.ml import serve_clients
    from skillbook.run import environment

    if args.url:
        result = serve_clients.load_test(args.url, args.clients, args.requests, args.max_tokens, api_key=args.api_key)
        result["backend"] = "external"
    else:
        if not args.model:
            ap.error("--model or --url is required (or set SKILLBOOK_MODEL)")
        path = Path(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            server = start(path, args.threads, not args.no_batching, Path(tmp))
            try:
                single = serve_clients.load_test(server.url, 1, 2, args.max_tokens)  # baseline: one client alone
                result = serve_clients.load_test(server.url, args.clients, args.requests, args.max_tokens)
            finally:
                server.stop()
        result["backend"] = "llama-cpp" if path.suffix == ".gguf" else "transformers"
        result["continuous_batching"] = path.suffix != ".gguf" and not args.no_batching
        result["single_client_latency_p50_s"] = single["latency_p50_s"]
        result["p50_latency_ratio_vs_single_client"] = result["latency_p50_s"] / single["latency_p50_s"]
    result["benchmark"] = "serve_load"
    result["cpu"], result["server_threads"] = environment.cpu_info(), args.threads
    print(json.dumps(result, indent=2))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
