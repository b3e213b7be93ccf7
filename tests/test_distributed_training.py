"""distributed-training: 2 gloo processes (DDP, FSDP2) follow the 1-process loss curve with the same global
batch, FSDP holds half the bytes per rank, and the launch files load with their own tools."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import dtype_tolerance, output, run_skill
from skillbook.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(prepared, tokenizer_dir, tmp_path_factory):
    base = {"max_steps": 12, "corpus": str(output(prepared, "corpus")), "tokenizer": str(tokenizer_dir)}
    return run_skill("distributed-training", tmp_path_factory.mktemp("dist"), {"base": base})


@pytest.mark.autocast
def test_ddp_and_fsdp_follow_one_process(result):
    rows = {r["strategy"]: r for r in json.loads((Path(result["run_dir"]) / "distributed.json").read_text())["rows"]}
    one, ddp, fsdp = rows["none"], rows["ddp"], rows["fsdp"]
    assert (one["processes"], one["grad_accum"]) == (1, 2)  # same sequences per step: 1 x 2 == 2 x 1
    assert all((r["processes"], r["grad_accum"]) == (2, 1) for r in (ddp, fsdp))
    assert one["final_train_loss"] < 6.0  # it learns (6.9 at step 1), so equal curves mean something
    # Only the order of float additions differs (gloo all-reduce vs local accumulation): ~1e-7 in fp32.
    for row in (ddp, fsdp):
        assert row["max_abs_loss_diff"] < dtype_tolerance(row, fp32=1e-4, bf16=5e-2), row
    # FSDP shards every parameter and its Adam moments over 2 ranks (padding aside): half of what DDP holds.
    assert ddp["bytes_vs_one_process"] == 1.0
    assert fsdp["bytes_vs_one_process"] == pytest.approx(0.5, abs=0.02)
    assert result["summary"]["rank0_bytes_vs_one_process"]["fsdp"] == fsdp["bytes_vs_one_process"]


def test_launch_files_load_with_their_tools(result):
    from accelerate.commands.config.config_args import ClusterConfig

    launch = output(result, "launch")
    kinds = {}
    for path in sorted((launch / "accelerate").glob("*.yaml")):
        config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: unknown keys raise
        kinds[path.stem] = (str(config.distributed_type.value), config.deepspeed_config.get("zero_stage"))
        assert config.num_processes == config.num_machines * 8 and config.mixed_precision == "bf16"
    assert kinds == {
        "ddp": ("MULTI_GPU", None),
        "fsdp": ("FSDP", None),
        "zero1": ("DEEPSPEED", 1),
        "zero2": ("DEEPSPEED", 2),
        "zero3": ("DEEPSPEED", 3),
    }
    for script in launch.glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
    sbatch = (launch / "sbatch.sh").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "--requeue" in sbatch and "resume=auto" in sbatch
    assert "--nnodes 2" in sbatch and "--rdzv-endpoint" in sbatch


def test_memory_math():
    from skillbook.ml.launch_files import bytes_per_gpu

    n = 7e9
    assert bytes_per_gpu(n, 8, "ddp") == 16 * n  # the ZeRO paper's 16 bytes/param for mixed-precision Adam
    assert bytes_per_gpu(n, 8, "zero1") == pytest.approx(4 * n + 12 * n / 8)
    assert bytes_per_gpu(n, 8, "zero2") == pytest.approx(2 * n + 14 * n / 8)
    assert bytes_per_gpu(n, 8, "zero3") == bytes_per_gpu(n, 8, "fsdp") == pytest.approx(16 * n / 8)


def test_bad_input_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="nproc: 16 sequences per step"):
        run_skill("distributed-training", tmp_path, {"nproc": 3})
    with pytest.raises(ConfigError, match="base: batch_size and parallel are set by this recipe"):
        run_skill("distributed-training", tmp_path, {"base": {"batch_size": 4}})
    with pytest.raises(ConfigError, match="base: pretraining refuses it"):
        run_skill("distributed-training", tmp_path, {"base": {"max_steps": 0}})
    assert not list(tmp_path.rglob("distributed.json"))
