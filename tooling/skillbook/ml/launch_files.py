"""What a cluster run needs besides the recipe: torchrun command lines, a SLURM batch script, accelerate
configs (DDP, FSDP2, DeepSpeed ZeRO 1-3) and the memory each strategy needs per GPU.

The accelerate configs are accelerate's own `ClusterConfig` objects written with its `to_yaml_file`, so
they load with `accelerate launch --config_file` (and `ClusterConfig.from_yaml_file`, which the tests use).
The memory math is the ZeRO paper's (Rajbhandari et al. 2020) for mixed-precision Adam: 2 bytes of bf16
weights + 2 of bf16 gradients + 12 of fp32 master weights and Adam moments per parameter; activations,
buffers and the all-gathered layer of FSDP/ZeRO-3 come on top.
"""

from __future__ import annotations

import shlex
from pathlib import Path

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
WEIGHT, GRAD, OPTIM = 2, 2, 12  # bytes per parameter: bf16 weight, bf16 grad, fp32 master + m + v


def bytes_per_gpu(params: float, gpus: int, strategy: str) -> float:
    """Weights + gradients + optimizer state one GPU holds (no activations). ZeRO-1 shards the optimizer
    state, ZeRO-2 also the gradients, ZeRO-3 and FSDP's full sharding everything."""
    shard = {
        "ddp": (WEIGHT + GRAD + OPTIM, 0),
        "zero1": (WEIGHT + GRAD, OPTIM),
        "zero2": (WEIGHT, GRAD + OPTIM),
        "zero3": (0, WEIGHT + GRAD + OPTIM),
        "fsdp": (0, WEIGHT + GRAD + OPTIM),
    }
    if strategy not in shard:
        raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    full, sharded = shard[strategy]
    return params * (full + sharded / gpus)


def memory_table(sizes: list[float], gpus: list[int]) -> list[dict]:
    """One row per (model size, GPU count): GiB per GPU for every strategy."""
    return [
        {"params": n, "gpus": g} | {s: round(bytes_per_gpu(n, g, s) / 2**30, 1) for s in STRATEGIES}
        for n in sizes
        for g in gpus
    ]


def accelerate_configs(out: Path, nodes: int, gpus_per_node: int, layer_cls: str = "LlamaDecoderLayer") -> list[Path]:
    """ddp.yaml, fsdp.yaml, zero1/2/3.yaml under `out`, written by accelerate's ClusterConfig (bf16, one
    process per GPU). On a multi-node job, `machine_rank` and `main_process_ip` come from the launch line."""
    from accelerate.commands.config.config_args import ClusterConfig

    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        compute_environment="LOCAL_MACHINE",
        mixed_precision="bf16",
        num_machines=nodes,
        num_processes=nodes * gpus_per_node,
        main_process_port=29500,
        rdzv_backend="c10d" if nodes > 1 else "static",
        same_network=True,
        use_cpu=False,
        debug=False,
    )
    fsdp = {
        "fsdp_version": 2,  # fully_shard (FSDP2), the API the pretraining recipe uses
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": layer_cls,  # one shard unit per decoder block
        "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": False,
    }
    configs = {"ddp": ClusterConfig(distributed_type="MULTI_GPU", **common)}
    configs["fsdp"] = ClusterConfig(distributed_type="FSDP", fsdp_config=fsdp, **common)
    for stage in (1, 2, 3):
        ds = {
            "zero_stage": stage,
            "offload_optimizer_device": "none",  # "cpu" trades speed for ~12 bytes/param of GPU memory
            "offload_param_device": "none",
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
        }
        if stage == 3:
            ds |= {"zero3_init_flag": True, "zero3_save_16bit_model": True}  # init sharded; save one file
        configs[f"zero{stage}"] = ClusterConfig(distributed_type="DEEPSPEED", deepspeed_config=ds, **common)
    paths = []
    for name, config in configs.items():
        config.to_yaml_file(out / f"{name}.yaml")
        paths.append(out / f"{name}.yaml")
    return paths


def torchrun_command(
    skill: str, sets: dict[str, str], gpus_per_node: int, nodes: int = 1, preset: str | None = None
) -> str:
    """The `skills run` line for one node (or every node of a multi-node job, c10d rendezvous on node 0)."""
    line = f"skills run {skill}" + (f" --preset {preset}" if preset else "")
    line += f" --launcher torchrun --nproc-per-node {gpus_per_node}"
    if nodes > 1:
        line += f' --nnodes {nodes} --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"'
    return line + "".join(f" --set {shlex.quote(f'{k}={v}')}" for k, v in sets.items())


def sbatch_script(
    skill: str, sets: dict[str, str], nodes: int, gpus_per_node: int, partition: str, hours: int, preset: str | None
) -> str:
    """A SLURM batch script: one task per node, each running torchrun over its GPUs; node 0 is the
    rendezvous; `resume=auto` plus `--requeue` make a preempted or failed job continue from its checkpoint."""
    command = torchrun_command(skill, {**sets, "resume": "auto"}, gpus_per_node, nodes, preset)
    return f"""#!/bin/bash
#SBATCH --job-name={skill}
#SBATCH --partition={partition}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={8 * gpus_per_node}
#SBATCH --time={hours}:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail
# node 0 of the allocation hosts the rendezvous; every node runs one torchrun with {gpus_per_node} workers
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=29500
export OMP_NUM_THREADS=8
# the runs dir must be on a filesystem every node sees: rank 0 writes, every rank resumes from it
srun --kill-on-bad-exit=1 {command} --runs-dir "${{RUNS_DIR:-$PWD/runs}}"
"""
