"""Distributed training: the same pretraining run on one process and on N torchrun processes (DDP, FSDP2),
the loss curves compared step by step and the bytes each rank holds; plus what a cluster run needs: the
torchrun lines, a SLURM batch script, accelerate configs (DDP, FSDP2, DeepSpeed ZeRO 1-3) and the memory
each strategy needs per GPU for 1B-70B models.

Story: the base pretraining config is checked by pretraining's own Config, and its batch split so that one
process accumulates N micro-steps where N processes take one each (the same sequences per step) -> the
corpus and tokenizer made once -> the reference: 1 process -> each strategy: `skills run pretraining
--launcher torchrun --nproc-per-node N --set parallel=<s>` as a subprocess (gloo on CPU, nccl on GPUs) ->
per step |loss difference| to the reference, rank 0's parameter + optimizer bytes -> launch files, checked
by their own tools -> memory table -> distributed.json, losses.png, report.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from skillbook.errors import ConfigError
from skillbook.run.recipe import RecipeConfig
from skillbook.run.runner import RunContext

OUTPUTS = {"launch": "dir", "report": "report"}
INPUTS: dict[str, str] = {}


class Cluster(BaseModel):
    """The cluster the launch files are written for (nothing runs there from this recipe)."""

    model_config = ConfigDict(extra="forbid")
    nodes: int = Field(2, ge=1, description="Nodes of the SLURM job and the multi-node torchrun line.")
    gpus_per_node: int = Field(8, ge=1, description="GPUs (= processes) per node.")
    partition: str = Field("gpu", pattern=r"^[\w.-]+$", description="SLURM partition.")
    hours: int = Field(24, ge=1, le=720, description="SLURM time limit in hours.")
    preset: str = Field("medium-117m", pattern=r"^[\w.-]+$", description="The pretraining preset the lines run.")


class Config(RecipeConfig):
    """The defaults (with recipe.yaml): 30 steps of the tiny pretraining on 1 process, then 2 x DDP, 2 x FSDP."""

    nproc: int = Field(2, ge=2, le=512, description="Processes per strategy run (one per GPU on CUDA, gloo on CPU).")
    strategies: list[Literal["ddp", "fsdp"]] = Field(
        ["ddp", "fsdp"], min_length=1, description="Which parallel runs to compare with the one-process run."
    )
    base: dict[str, Any] = Field(
        default_factory=dict,
        description="pretraining overrides of every run (recipe.yaml: 30 steps). batch_size is set by the recipe: "
        "total_batch_tokens / seq_len / nproc, so 1 process accumulates nproc micro-steps.",
    )
    cluster: Cluster = Field(default_factory=Cluster, description="The cluster the launch files describe.")
    memory_params: list[float] = Field([1e9, 8e9, 70e9], min_length=1, description="Model sizes of the memory table.")
    memory_gpus: list[int] = Field([8, 64], min_length=1, description="GPU counts of the memory table.")
    run_timeout: float = Field(1800, gt=0, description="Seconds after which one pretraining run is stopped.")


def check_base(cfg: Config, ctx: RunContext) -> tuple[Any, dict]:
    """pretraining's recipe and the base config with the batch split; a refusal names the field."""
    from skillbook.run import recipe as recipe_mod

    if ctx.skills_dir is None or not (ctx.skills_dir / "pretraining" / "recipe.py").is_file():
        raise ConfigError("base: the pretraining skill is not in this library; distributed-training runs it")
    rec = recipe_mod.load(ctx.skills_dir / "pretraining")
    if "batch_size" in cfg.base or "parallel" in cfg.base:
        raise ConfigError("base: batch_size and parallel are set by this recipe; remove them from base")
    try:
        resolved = recipe_mod.resolve(rec, overrides=cfg.base)
    except ConfigError as err:
        raise ConfigError(f"base: pretraining refuses it: {' '.join(str(err).split())}") from None
    seqs = resolved.total_batch_tokens // resolved.seq_len
    if seqs % cfg.nproc:
        raise ConfigError(
            f"nproc: {seqs} sequences per step (total_batch_tokens / seq_len) do not split over {cfg.nproc} "
            f"processes; pick an nproc that divides {seqs} or change base.total_batch_tokens"
        )
    return rec, {**cfg.base, "batch_size": seqs // cfg.nproc}


def losses(result: dict) -> list[float]:
    """The training loss per step from a run's metrics.jsonl (rank 0 writes it)."""
    lines = (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    from skillbook.ml import launch_files
    from skillbook.ml.subruns import run_child, shared_inputs
    from skillbook.ml.training.metrics import plot_losses

    rec, base = check_base(cfg, ctx)

    # ---- inputs every run shares, made once: the same tokens for every strategy -------------------------
    base = shared_inputs(rec.INPUTS, base, ctx)
    ctx.progress(1 + len(cfg.strategies), "runs")

    # ---- the runs: one thread per process, so N processes use N cores and float order is comparable ------
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    for name, parallel, procs in [("1 process", "ddp", 1)] + [
        (f"{cfg.nproc} x {s}", s, cfg.nproc) for s in cfg.strategies
    ]:
        launcher = ("--launcher", "torchrun", "--nproc-per-node", str(procs)) if procs > 1 else ()
        where = ctx.out_dir / "runs" / name.replace(" ", "")
        result = run_child("pretraining", {**base, "parallel": parallel}, where, threads=1, timeout=cfg.run_timeout,
                           launcher=launcher)  # fmt: skip
        s, curves[name] = result["summary"], losses(result)
        held = s["rank0"]["param_bytes"] + s["rank0"]["optimizer_bytes"]
        rows.append({
            "run": name, "strategy": parallel if procs > 1 else "none", "processes": s["world_size"],
            "grad_accum": s["grad_accum"], "micro_batch": s["micro_batch"], "final_train_loss": s["final_train_loss"],
            "final_val_loss": s["final_val_loss"], "rank0_param_bytes": s["rank0"]["param_bytes"],
            "rank0_optimizer_bytes": s["rank0"]["optimizer_bytes"], "rank0_bytes": held,
            "tokens_per_s": s["tokens_per_s"], "train_seconds": s["train_seconds"], "dtype": s.get("dtype"),
            "run_dir": result["run_dir"],
        })  # fmt: skip
        ctx.info(f"{name:<10} loss {curves[name][0]:.4f} -> {curves[name][-1]:.4f}, rank 0 holds {held / 1e6:.2f} MB "
                 f"(params + Adam), {s['tokens_per_s']:.0f} tokens/s")  # fmt: skip
        ctx.progress(len(rows), "runs")

    # ---- the effect: equal curves, and what sharding saves per rank ------------------------------------
    ref, ref_bytes = curves["1 process"], rows[0]["rank0_bytes"]
    for row in rows:
        curve = curves[row["run"]]
        if len(curve) != len(ref):
            raise RuntimeError(f"{row['run']}: {len(curve)} logged steps, the reference {len(ref)}")
        row["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(curve, ref))
        row["bytes_vs_one_process"] = round(row["rank0_bytes"] / ref_bytes, 4)
    plot_losses({name: list(enumerate(c, 1)) for name, c in curves.items()}, ctx.out_dir / "losses.png")

    # ---- launch files for a real cluster, each checked by its own tool --------------------------------
    launch = ctx.out_dir / "launch"
    c = cfg.cluster
    sets = {"corpus": "/shared/corpus", "tokenizer": "/shared/tokenizer"}
    configs = launch_files.accelerate_configs(launch / "accelerate", c.nodes, c.gpus_per_node)
    fsdp = {**sets, "parallel": "fsdp"}
    lines = {
        "torchrun-1-node.sh": launch_files.torchrun_command("pretraining", sets, c.gpus_per_node, 1, c.preset),
        "torchrun-fsdp-1-node.sh": launch_files.torchrun_command("pretraining", fsdp, c.gpus_per_node, 1, c.preset),
        "sbatch.sh": launch_files.sbatch_script("pretraining", fsdp, c.nodes, c.gpus_per_node, c.partition, c.hours,
                                                c.preset),
    }  # fmt: skip
    for file, text in lines.items():
        (launch / file).write_text(text if text.startswith("#!") else f"#!/bin/bash\nset -euo pipefail\n{text}\n")
        (launch / file).chmod(0o755)

    # ---- memory per GPU, per strategy, for real model sizes --------------------------------------------
    memory = launch_files.memory_table(cfg.memory_params, cfg.memory_gpus)
    report = {"rows": rows, "memory_gib": memory, "accelerate_configs": [p.name for p in configs]}
    (ctx.out_dir / "distributed.json").write_text(json.dumps(report, indent=2) + "\n")
    by = {row["strategy"]: row for row in rows}
    ctx.summary.update(
        processes=cfg.nproc,
        steps=len(ref),
        max_abs_loss_diff={k: by[k]["max_abs_loss_diff"] for k in cfg.strategies},
        rank0_bytes_vs_one_process={k: by[k]["bytes_vs_one_process"] for k in cfg.strategies},
    )
    ctx.report(render_report(rows, memory, launch, ctx.out_dir))
    return {"launch": launch, "report": ctx.out_dir / "report.md"}


def render_report(rows: list[dict], memory: list[dict], launch: Path, run_dir: Path) -> str:
    """report.md: the comparison table, the loss plot, the memory table and the launch files."""
    from skillbook.ml.launch_files import STRATEGIES

    out = [
        "# Distributed training: one process vs DDP vs FSDP2",
        "",
        "Same tokens per step in every run; the loss difference is the largest over all steps. Bytes: rank 0's "
        "parameters + AdamW state (FSDP holds its shard only).",
        "",
        "| run | processes x accum x micro | final train loss | max abs loss diff | rank 0 MB | vs 1 process | "
        "tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['run']} | {r['processes']} x {r['grad_accum']} x {r['micro_batch']} | {r['final_train_loss']:.4f} "
            f"| {r['max_abs_loss_diff']:.2e} | {r['rank0_bytes'] / 1e6:.2f} | {r['bytes_vs_one_process']:.3f} "
            f"| {r['tokens_per_s']:.0f} |"
        )
    out += ["", "![losses](losses.png)", "", "## GiB per GPU (weights + grads + Adam, bf16 mixed precision)", ""]
    out += ["| params | GPUs | " + " | ".join(STRATEGIES) + " |", "|---|---|" + "---|" * len(STRATEGIES)]
    for m in memory:
        out.append(f"| {m['params'] / 1e9:g}B | {m['gpus']} | " + " | ".join(f"{m[s]:g}" for s in STRATEGIES) + " |")
    files = sorted(str(p.relative_to(run_dir)) for p in launch.rglob("*") if p.is_file())
    return "\n".join(out + ["", "Launch files: " + ", ".join(f"`{f}`" for f in files), ""])
