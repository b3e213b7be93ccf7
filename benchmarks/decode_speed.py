"""Decode speed: llama.cpp (GGUF F16, Q8_0, Q4_K_M, Q4_0) vs transformers generate() on the same model and prompts.

Prints JSON: greedy decode tokens/s per format (prefill excluded, best over prompts; medians too) and the ratio
to transformers fp32. Usage:

    python benchmarks/decode_speed.py --model runs/pretraining/latest/model [--tokens 128 --threads 2]

The model defaults to $SKILLBOOK_MODEL. Goal on 2 cores: llama.cpp Q8_0 >= 5x transformers fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

PROMPTS = ["Question: What colour is Mira's kite?\nAnswer:", "Mira lives in", "The baker of Ashby", "3 + 4 ="]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default=os.environ.get("SKILLBOOK_MODEL"),
        help="hf-model directory (any family llama.cpp's converter supports, tokenizer inside)",
    )
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both engines")
    ap.add_argument("--types", default="F16,Q8_0,Q4_K_M,Q4_0", help="GGUF types to measure")
    args = ap.parse_args()
    if not args.model:
        ap.error("--model is required (or set SKILLBOOK_MODEL)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml import gguf_convert as gc
    from skillbook.ml import gguf_export as gx
    from skillbook.run import environment

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_ctx = int(getattr(model.config, "max_position_embeddings", None) or model.config.n_positions)
    prompts = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    new = min(args.tokens, n_ctx - max(map(len, prompts)) - 1)

    # best over prompts (as timeit takes the minimum time): on a shared machine the slow runs are noise
    results = {"transformers fp32": max(gx.torch_decode_speed(model, p, new) for p in prompts)}
    with tempfile.TemporaryDirectory() as tmp:
        # llama.cpp's converter writes every type in one run (K-quants and Q4_0 by its quantizer from F16)
        files = gc.convert_many(model_dir, {t: Path(tmp) / f"{t}.gguf" for t in args.types.split(",")})
        sizes, spread = {}, {}
        for qtype, info in files.items():
            path = Path(info["path"])
            llm = gx.load_gguf(path, n_ctx=n_ctx, threads=args.threads)
            gx.gguf_decode_speed(llm, prompts[0], 8)  # warm-up
            speeds = [gx.gguf_decode_speed(llm, p, new) for p in prompts]
            results[f"llama.cpp {qtype}"] = max(speeds)
            spread[qtype] = round(statistics.median(speeds), 1)
            sizes[qtype] = path.stat().st_size
            del llm
    base = results["transformers fp32"]
    print(
        json.dumps(
            {
                "benchmark": "decode_speed",
                "model": str(model_dir),
                "params": sum(p.numel() for p in model.parameters()),
                "new_tokens": new,
                "prompts": len(prompts),
                "threads": args.threads,
                "cpu": environment.cpu_info(),
                "tokens_per_s": {k: round(v, 1) for k, v in results.items()},
                "ratio_vs_transformers_fp32": {k: round(v / base, 2) for k, v in results.items()},
                "llama_cpp_median_tokens_per_s": spread,
                "gguf_bytes": sizes,
                "goal_q8_0_at_least_5x": results.get("llama.cpp Q8_0", 0) >= 5 * base,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
