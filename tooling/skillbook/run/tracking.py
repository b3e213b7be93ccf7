"""Experiment tracking: every `ctx.log` record mirrored to TensorBoard event files and/or an MLflow store,
chosen by the `tracking` field every recipe Config has.

metrics.jsonl stays the run's own record; the trackers get the same numbers (the numeric values of each
record, at its step) so TensorBoard and the MLflow UI can compare runs side by side. TRL's metrics reach
them too: the post-training recipes pass TRL's logs through `ctx.log`. TensorBoard writes into
`<run>/tensorboard/`; MLflow writes to `tracking.mlflow_uri`, else MLflow's own MLFLOW_TRACKING_URI, else
`sqlite:///<run>/mlflow.db` (nothing outside the run unless asked for). Both libraries load only when
enabled.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-./ ]")


class Tracking(BaseModel):
    """Where a run's metrics are mirrored (besides metrics.jsonl)."""

    model_config = ConfigDict(extra="forbid")
    tensorboard: bool = Field(default=False, description="Write TensorBoard event files into <run>/tensorboard.")
    mlflow: bool = Field(default=False, description="Log params and metrics to an MLflow tracking store.")
    mlflow_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (sqlite:///path.db, http://host:5000). None = MLFLOW_TRACKING_URI, else "
        "sqlite:///<run>/mlflow.db.",
    )
    experiment: str | None = Field(default=None, description="MLflow experiment name; None = the skill's name.")

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow


def mlflow_uri(tracking: Tracking, run_dir: Path) -> str:
    return tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve()}/mlflow.db"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: a config as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trackers:
    """The open trackers of one run: `log(step, metrics)` per ctx.log record, `close(failed)` at the end."""

    def __init__(self, tracking: Tracking, run_dir: Path, skill: str, config: dict):
        self.tensorboard: Any = None
        self.mlflow: Any = None
        self.mlflow_run: str | None = None
        self._records = 0
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if tracking.mlflow:
            from mlflow.tracking import MlflowClient

            self.mlflow = MlflowClient(mlflow_uri(tracking, run_dir))
            name = tracking.experiment or skill
            found = self.mlflow.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.mlflow.create_experiment(name)
            run = self.mlflow.create_run(experiment, run_name=run_dir.name, tags={"skill": skill})
            self.mlflow_run = run.info.run_id
            params = [(k, str(v)[:500]) for k, v in flatten(config).items() if k != "tracking.mlflow_uri"]
            from mlflow.entities import Param

            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.mlflow.log_batch(self.mlflow_run, params=[Param(k, v) for k, v in params[i : i + 100]])

    def log(self, step: int | None, metrics: dict[str, Any]) -> None:
        """The numeric, finite values of one record, at its step (the record's index when it has none)."""
        at = step if step is not None else self._records
        self._records += 1
        values = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if not values:
            return
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, at)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(_MLFLOW_KEY.sub("_", k), v, now, at) for k, v in values.items()]
            self.mlflow.log_batch(self.mlflow_run, metrics=batch)

    def close(self, failed: bool = False) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run, status="FAILED" if failed else "FINISHED")
            self.mlflow = None
