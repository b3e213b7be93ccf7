"""Pretraining throughput: the recipe's default training settings vs a plain fp32 eager loop, same model, same run.

For the `tiny` and `small-25m` presets (vocab 950, the embedded world's tokenizer size) this times
training steps of transformers' LlamaForCausalLM under several settings and prints one JSON object:

- plain: fp32, no autocast, torch.optim.AdamW with its defaults (foreach), eager: the baseline;
- recipe: what `skills run pretraining` does by default here (dtype=auto, fused AdamW, compile=auto);
- fused: fp32 + fused AdamW, eager (what the recipe does with compile off);
- compiled: fp32 + fused AdamW + torch.compile (what `compile: true` buys on this device);
- bf16: bf16 autocast + fused AdamW, eager (skipped on CPUs without native bf16 unless --force-bf16).

first_step_s includes torch.compile's compilation where the variant compiles (first round: a cold cache
unless an earlier process compiled the same graph). run_s estimates the preset's whole default run
(max_steps x total_batch_tokens) as first_step_s + tokens / tokens_per_s; `recipe_vs_fastest_run` compares
that with the variant that would finish first, the number that matters for a short run.

Every variant starts from the same weights and sees the same batches, so `max_loss_diff_vs_plain` says
whether a setting changes the loss curve. MFU = FLOPs/token x tokens/s / the measured matmul peak.
A 2-core VM's speed drifts by 5-10 % within a minute, so the variants run in `--rounds` interleaved rounds
and each reports its median; `recipe_vs_fastest` is the recipe's median over the fastest variant's.

    python benchmarks/pretrain_throughput.py [--steps 8] [--rounds 3] [--configs tiny,small-25m]
        [--variants plain,recipe,fused,compiled,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import skillbook  # noqa: F401  (before torch: sets GOMP_SPINCOUNT as `skills run` does)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 950  # the tokenization skill's default tokenizer on the embedded world


def load_recipe():
    from skillbook.run import recipe

    rec = recipe.load(ROOT / "skills" / "pretraining")
    return rec, sys.modules[f"skillbook_recipes.{rec.name}"]


def time_variant(cfg, module, variant: str, steps: int, warmup: int, micro: int, seed: int = 0) -> dict:
    """Train `warmup + steps` steps with one setting; tokens/s over the timed steps and the loss curve."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from skillbook.ml.training import optim, precision

    torch.manual_seed(seed)
    raw = LlamaForCausalLM(module.llama_config(cfg, VOCAB))
    device = "cpu" if not torch.cuda.is_available() else "cuda"
    raw = raw.to(device)
    if variant == "plain":
        dtype, compiled, opt = "float32", False, torch.optim.AdamW(raw.parameters(), lr=cfg.lr)
    else:
        n_params = sum(p.numel() for p in raw.parameters())
        recipe_dtype = precision.pick_dtype("auto", device, n_params)
        recipe_compile, _ = precision.choose_compile("auto", device, n_params, recipe_dtype)  # compile=auto's rule
        dtype = {
            "recipe": recipe_dtype,
            "bf16": "bfloat16",
            "fused": "float32",
            "compiled": "float32",
        }[variant]
        compiled = {"recipe": recipe_compile, "bf16": False, "fused": False, "compiled": True}[variant]
        opt = optim.adamw(raw, cfg.lr, 0.0, (0.9, 0.999), fused=True)  # same hyper-parameters as plain's defaults
        for g in opt.param_groups:
            g["weight_decay"] = 0.01  # torch.optim.AdamW's default, so the update is the same rule
    torch.use_deterministic_algorithms(compiled and device == "cpu", warn_only=True)  # as the recipe compiles on CPU
    model = torch.compile(raw) if compiled else raw
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, VOCAB, (micro, cfg.seq_len + 1), generator=gen) for _ in range(warmup + steps)]
    losses, t_first, t0 = [], 0.0, 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        ts = time.perf_counter()
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        with precision.autocast(device, dtype):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i == 0:
            t_first = time.perf_counter() - ts  # includes compilation when compiled
    elapsed = time.perf_counter() - t0
    n_params = sum(p.numel() for p in raw.parameters())
    return {
        "dtype": dtype,
        "compile": compiled,
        "tokens_per_s": round(steps * micro * cfg.seq_len / elapsed, 1),
        "first_step_s": round(t_first, 2),
        "losses": losses,
        "params": n_params,
    }


def main(argv: list[str] | None = None) -> dict:
    import torch

    from skillbook.ml.training import metrics, precision
    from skillbook.run import recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant; the median is reported")
    ap.add_argument("--configs", default="tiny,small-25m")
    ap.add_argument("--variants", default="plain,recipe,fused,compiled,bf16")
    ap.add_argument("--force-bf16", action="store_true", help="time bf16 even on a CPU without native bf16 (slow)")
    args = ap.parse_args(argv)

    rec, module = load_recipe()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = {dt: metrics.measure_peak_flops(device, dt) for dt in ("float32", "bfloat16")}
    import platform

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    result: dict = {
        "device": device,
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": precision.cpu_bf16_fast(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_1m": os.getloadavg()[0],
        "peak_flops": {k: round(v) for k, v in peaks.items()},
        "configs": {},
    }
    for name in args.configs.split(","):
        cfg = recipe.resolve(rec, preset=name)
        micro = min(cfg.batch_size, max(1, 4096 // cfg.seq_len))  # ~4K tokens per step keeps CPU runs short
        out: dict = {"batch": f"{micro}x{cfg.seq_len}"}
        plain_losses = None
        variants = args.variants.split(",")
        for variant in list(variants):
            if variant == "bf16" and device == "cpu" and not precision.cpu_bf16_fast() and not args.force_bf16:
                out[variant] = {
                    "skipped": f"no native bf16 on this CPU (oneDNN reports none): bf16 matmuls run at "
                    f"{peaks['bfloat16'] / 1e9:.1f} GFLOP/s vs {peaks['float32'] / 1e9:.0f} fp32; "
                    "--force-bf16 times it anyway"
                }
                variants.remove(variant)
        rounds: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:
                rounds[variant].append(time_variant(cfg, module, variant, args.steps, args.warmup, micro))
        for variant in variants:
            runs = rounds[variant]
            r = dict(runs[0])
            r["tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in runs)
            r["tokens_per_s_rounds"] = [x["tokens_per_s"] for x in runs]
            fpt = metrics.flops_per_token(r["params"], cfg.n_layer, cfg.d_model, cfg.seq_len)
            out["params"], out["flops_per_token"] = r["params"], fpt
            losses = r.pop("losses")
            plain_losses = losses if variant == "plain" else plain_losses
            r["mfu"] = round(fpt * r["tokens_per_s"] / peaks[r["dtype"]], 4)
            r.pop("params")
            if plain_losses is not None and variant != "plain":
                r["max_loss_diff_vs_plain"] = round(max(abs(a - b) for a, b in zip(losses, plain_losses)), 5)
            out[variant] = r
            print(f"{name:>10} {variant:>8}: {r['tokens_per_s']:9.1f} tokens/s  MFU {r['mfu']:.1%}", file=sys.stderr)
        # what a user waits for: the preset's whole default run, the first step (compilation) included
        out["run_tokens"] = run_tokens = cfg.max_steps * cfg.total_batch_tokens
        for variant in variants:
            r = out[variant]
            r["run_s"] = round(r["first_step_s"] + run_tokens / r["tokens_per_s"], 1)
        if "recipe" in rounds:
            fastest = max(variants, key=lambda v: out[v]["tokens_per_s"])
            out["fastest"] = fastest
            out["recipe_vs_fastest"] = round(out["recipe"]["tokens_per_s"] / out[fastest]["tokens_per_s"], 3)
            fastest_run = min(variants, key=lambda v: out[v]["run_s"])
            out["fastest_run"] = fastest_run
            out["recipe_vs_fastest_run"] = round(out[fastest_run]["run_s"] / out["recipe"]["run_s"], 3)
        if "plain" in out:
            out["plain_tokens_per_s"] = out["plain"]["tokens_per_s"]
            for variant in args.variants.split(","):
                if variant != "plain" and "tokens_per_s" in out[variant]:
                    out[variant]["speedup_vs_plain"] = round(
                        out[variant]["tokens_per_s"] / out["plain_tokens_per_s"], 3
                    )
        result["configs"][name] = out
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
