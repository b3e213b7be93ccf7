"""experiment-tracking and the `tracking` field every recipe has.

- the skill's comparison: each run's TensorBoard event file (EventAccumulator) and MLflow store
  (MlflowClient) read back here hold the same values at the same steps as its metrics.jsonl, the runs are
  ranked by MLflow as metrics.jsonl ranks them, and the config arrives as MLflow params;
- a TRL recipe (sft) with `tracking.tensorboard` writes TRL's loss into the event file;
- a variant the skill's Config refuses fails before any run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import output, run_skill
from skillbook.errors import ConfigError

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def _events(run_dir: Path, key: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(key)}


def _jsonl(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_trackers_hold_what_metrics_jsonl_holds(prepared, tokenizer_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    base = {"max_steps": 10, "eval_interval": 5, "eval_windows": 2}
    base.update(corpus=str(output(prepared, "corpus")), tokenizer=str(tokenizer_dir))
    res = run_skill("experiment-tracking", tmp_path, {"base": base, "variants": [{"lr": 6e-3}, {"lr": 1e-4}]})
    s = res["summary"]
    assert s["runs"] == 2 and s["same_steps"] and s["mlflow_max_abs_diff"] == 0.0
    client = MlflowClient(f"sqlite:///{output(res, 'store')}")
    experiment = client.get_experiment_by_name("pretraining")
    mlflow_runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    finals = {}
    trial_runs = output(res, "runs").glob("*/runs/pretraining/*")
    for run_dir in sorted(p for p in trial_runs if p.is_dir() and not p.is_symlink()):  # not runs/pretraining/latest
        mlflow_run = mlflow_runs[run_dir.name]
        assert mlflow_run.info.status == "FINISHED"
        assert float(mlflow_run.data.params["max_steps"]) == 10 and "tracking.tensorboard" in mlflow_run.data.params
        for key in ("loss", "val_loss"):
            ours = _jsonl(run_dir, key)
            assert len(ours) >= 3
            board = _events(run_dir, key)
            flow = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, key)}
            assert sorted(board) == sorted(flow) == sorted(ours), key
            for step, value in ours.items():
                assert board[step] == pytest.approx(value, rel=1e-6) and flow[step] == value
        finals[float(mlflow_run.data.params["lr"])] = ours[max(ours)]
    assert finals[6e-3] < finals[1e-4]  # 100 x the lr learns more in 10 steps
    assert s["best_run"] == 0 and s["best_val_loss"] == pytest.approx(finals[6e-3])
    assert (output(res, "report").parent / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_tracking_on_a_trl_recipe(prepared, family_model, tmp_path):
    rows = (output(prepared, "sft_data") / "train.jsonl").read_text().splitlines()[:40]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(rows) + "\n")
    sets = {"model": str(family_model("llama")), "data": str(data), "steps": 4, "batch_size": 4, "eval_limit": 4}
    sets.update(max_new_tokens=2, eval_fraction=0.25, logging={"every": 1}, tracking={"tensorboard": True})
    res = run_skill("sft", tmp_path / "runs", sets)
    run_dir = Path(res["run_dir"])
    ours, board = _jsonl(run_dir, "loss"), _events(run_dir, "loss")
    assert len(ours) == 4 and sorted(board) == sorted(ours)
    assert all(board[k] == pytest.approx(v, rel=1e-6) for k, v in ours.items())
    assert not (run_dir / "mlflow.db").exists()  # only the trackers asked for


def test_a_variant_the_skill_refuses_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match=r"variants\[1\]: pretraining refuses it: .*lrr"):
        run_skill("experiment-tracking", tmp_path, {"variants": [{"lr": 1e-3}, {"lrr": 1}]})
    assert not list(tmp_path.rglob("metrics.jsonl"))
