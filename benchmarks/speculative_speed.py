"""Speculative decoding speed: greedy tokens/s with a draft and with prompt lookup vs the target alone, same run.

Prints JSON: per method the median tokens/s over `--rounds` interleaved rounds (a 2-core VM drifts 5-10 %
within a minute, so every round runs every method once), the ratio to the same engine's target alone, the
acceptance rate (accepted / proposed, counted from the target's verification passes by
skillbook.ml.speculative) and whether the tokens equal the target's own. Usage:

    python benchmarks/speculative_speed.py --model TARGET_DIR --draft DRAFT_DIR [--tokens 48 --rounds 5]

The prompts are openings of held-out documents of the embedded world (val split, seed 0). Methods:
transformers target alone, + draft with --draft-tokens rounds (confidence 0.4), + prompt lookup with
--lookup tokens, the draft alone, and llama.cpp (GGUF F16) alone / + prompt lookup for Llama targets.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import skillbook  # noqa: F401  (before torch: sets GOMP_SPINCOUNT as `skills run` does)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("SKILLBOOK_MODEL"), help="target hf-model dir")
    ap.add_argument("--draft", required=True, help="draft hf-model dir on the target's tokenizer")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft-tokens", default="3,5", help="num_assistant_tokens values to time")
    ap.add_argument("--lookup", default="2,3,10", help="prompt_lookup_num_tokens values to time")
    args = ap.parse_args(argv)
    if not args.model:
        ap.error("--model is required (or set SKILLBOOK_MODEL)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml import speculative as sp
    from skillbook.ml.gguf_export import write_gguf
    from skillbook.ml.synthetic import write_default_data

    if why := sp.tokenizer_mismatch(args.model, args.draft):
        sys.exit(f"--draft: its tokenizer differs from the target's ({why})")
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    target = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    tmp = Path(tempfile.mkdtemp())
    val = write_default_data(tmp / "data")["corpus"] / "val.jsonl"
    texts = [json.loads(line)["text"] for line in val.read_text().splitlines()][: args.prompts]
    prompts = [
        ([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"])[: args.prompt_tokens] for t in texts
    ]
    n_ctx = int(target.config.max_position_embeddings)
    new = min(args.tokens, n_ctx - max(map(len, prompts)) - 1)

    def assisted(k: int):
        def fn(p):
            sp.configure_draft(draft, k, 0.4)
            return sp.generate(target, p, new, draft=draft)

        return fn

    methods: dict[str, Callable[[list[int]], sp.Decode]] = {"target alone": lambda p: sp.generate(target, p, new)}
    methods.update({f"+ draft (k={k})": assisted(int(k)) for k in args.draft_tokens.split(",")})
    for k in args.lookup.split(","):
        methods[f"+ prompt lookup ({k})"] = functools.partial(
            lambda n, p: sp.generate(target, p, new, lookup=n), int(k)
        )
    methods["draft alone"] = lambda p: sp.generate(draft, p, new)
    if target.config.model_type == "llama":
        gguf = tmp / "target-F16.gguf"
        write_gguf(Path(args.model), gguf, "F16")
        engines = {"llama.cpp alone": sp.load_gguf_lookup(gguf, n_ctx, args.threads, None)}
        for k in args.lookup.split(","):
            engines[f"llama.cpp + prompt lookup ({k})"] = sp.load_gguf_lookup(gguf, n_ctx, args.threads, int(k))
        for name, llm in engines.items():
            methods[name] = functools.partial(lambda llm, p: sp.gguf_generate(llm, p, new), llm)

    for fn in methods.values():
        fn(prompts[0][:4])  # warm-up
    speeds: dict[str, list[float]] = {m: [] for m in methods}
    first: dict[str, list] = {}
    for r in range(args.rounds):
        for name, fn in methods.items():
            runs = [fn(p) for p in prompts]
            speeds[name].append(sum(len(d.tokens) for d in runs) / sum(d.seconds for d in runs))
            first.setdefault(name, runs)
        print(f"round {r + 1}: " + ", ".join(f"{m} {v[-1]:.0f}" for m, v in speeds.items()), file=sys.stderr)

    out: dict = {}
    for name, runs in first.items():
        ref = "llama.cpp alone" if name.startswith("llama.cpp") else "target alone"
        proposed = sum(d.proposed for d in runs)
        med = statistics.median(speeds[name])
        out[name] = {
            "tokens_per_s": round(med, 1),
            "tokens_per_s_rounds": [round(s, 1) for s in speeds[name]],
            "ratio_vs_target_alone": round(med / statistics.median(speeds[ref]), 3),
            "acceptance_rate": round(sum(d.accepted for d in runs) / proposed, 4) if proposed else None,
            "tokens_per_target_pass": round(sum(len(d.tokens) for d in runs) / sum(d.passes for d in runs), 3),
            "identical_to_target": None
            if name == "draft alone"
            else [d.tokens for d in runs] == [d.tokens for d in first[ref]],
        }
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    result = {
        "benchmark": "speculative_speed",
        "model": str(args.model),
        "draft": str(args.draft),
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "prompts": len(prompts),
        "new_tokens": new,
        "rounds": args.rounds,
        "threads": args.threads,
        "cpu": cpu,
        "dtype": "float32",
        "torch": torch.__version__,
        "load_avg_1m": os.getloadavg()[0],
        "methods": out,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
