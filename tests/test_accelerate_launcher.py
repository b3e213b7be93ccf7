"""`skills run sft --launcher accelerate`: 2 processes x 1 micro-batch follow 1 process x 2 accumulated ones.

The same check as the torchrun test of pretraining (tests/test_pretraining.py), on a Trainer-based recipe:
`accelerate launch --multi_gpu` on a CPU runs DDP over gloo (DistributedType.MULTI_CPU), the Trainer's
Accelerator shards the batches (process r takes micro-batch r of each pair) and all-reduces the gradients.
Both runs use the embedded synthetic data (data unset), so every rank also writes the same default data
into the run directory: the writes must not race. Rank 0 alone saves, merges, measures and reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import output, run_skill

torch = pytest.importorskip("torch", reason="sft needs torch, trl and peft (the `train` extra)")
pytest.importorskip("accelerate")

# 12 optimizer steps of 8 sequences (4 per micro-batch); a held-out set of 4 keeps the before/after
# exact match (generation) short: the comparison is about training.
TINY = {"steps": 12, "batch_size": 4, "logging": {"every": 1}, "eval_limit": 4, "max_new_tokens": 4}


def losses(result: dict) -> list[float]:
    lines = (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [m["loss"] for m in map(json.loads, lines) if "loss" in m]


def adapter_weights(result: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(output(result, "adapter") / "adapter_model.safetensors")


@pytest.mark.slow
def test_accelerate_two_processes_follow_one_process_curve(pretrained_model, tmp_path):
    started = time.time()
    values = {**TINY, "model": str(pretrained_model)}
    one = run_skill("sft", tmp_path / "one", {**values, "grad_accum": 2})
    sets = [a for k, v in {**values, "grad_accum": 1}.items() if k != "logging" for a in ("--set", f"{k}={v}")]
    sets += ["--set", "logging.every=1"]
    argv = [sys.executable, "-m", "skillbook.cli", "run", "sft", "--runs-dir", str(tmp_path / "two"), "--json"]
    res = subprocess.run(
        [*argv, "--launcher", "accelerate", "--nproc-per-node", "2", *sets],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(res.stdout)
    print(f"wall time of both runs: {time.time() - started:.0f} s")

    # the layout each run reports: equal global batch, 1 x 2 accumulated vs 2 processes x 1
    assert one["summary"]["world_size"] == 1 and two["summary"]["world_size"] == 2
    assert one["summary"]["global_batch"] == two["summary"]["global_batch"] == 8
    log = (Path(two["run_dir"]) / "log.txt").read_text()
    assert "trained on 2 process(es) (MULTI_CPU)" in log, log

    curve1, curve2 = losses(one), losses(two)
    assert len(curve1) == len(curve2) == TINY["steps"]
    assert curve1[-1] < curve1[0] - 1.0, curve1  # it learns, so matching curves mean something
    diff = max(abs(a - b) for a, b in zip(curve1, curve2))
    print(f"max |loss difference| over {len(curve1)} steps: {diff:.3g} (first {curve1[0]:.3f}, last {curve1[-1]:.3f})")
    # Same sequences, same LoRA init, same update. The Trainer divides each micro-batch's summed token loss
    # by the token count of the whole step (average_tokens_across_devices gathers the count across ranks and
    # scales the loss by world size to undo DDP's mean), so both runs take the same step, and with two
    # addends gloo's all-reduce sum equals the local accumulation exactly. Measured: 0.0 (bit-identical)
    # over 12 steps on a 2-core Zen 3 (AVX2), fp32 (sft trains fp32 on a CPU). 1e-4 leaves room for a kernel
    # that adds in another order elsewhere, and stays far below the loss's own change per step (~0.3-3 here).
    assert diff < 1e-4, list(zip(curve1, curve2))

    # rank 0 saved what the ranks trained together: the adapters agree
    w1, w2 = adapter_weights(one), adapter_weights(two)
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    # rank 0 alone wrote the outputs (hashed in outputs.json), and the racing default-data writes left
    # neither a temporary file nor a torn one behind
    assert all(art["sha256"] for art in two["outputs"].values())
    run_dir = Path(two["run_dir"])
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "error.txt").exists()
    train = (run_dir / "data" / "sft-data" / "train.jsonl").read_text()
    assert train == (Path(one["run_dir"]) / "data" / "sft-data" / "train.jsonl").read_text()
    assert "training_args.bin" not in {p.name for p in output(two, "adapter").iterdir()}
