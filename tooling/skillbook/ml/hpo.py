"""Hyperparameter search glue: a typed search space read from YAML, dotted config keys, Optuna's plots.
A trial runs as a `skills run` subprocess (skillbook.ml.subruns), its metrics.jsonl reported to the pruner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

POLL_SECONDS = 0.5


class ParamSpec(BaseModel):
    """One searched field: a float or int range (optionally log-scaled), or a list of choices."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"] = Field(..., description="float, int or categorical.")
    low: float | None = Field(None, description="Lower bound (float/int).")
    high: float | None = Field(None, description="Upper bound, inclusive (float/int).")
    log: bool = Field(False, description="Sample on a log scale (learning rates, weight decay).")
    step: float | None = Field(None, gt=0, description="Grid step of an int/float range; None = continuous.")
    choices: list[Any] | None = Field(None, description="The values of a categorical parameter.")

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs `choices: [...]`")
            return self
        if self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"a {self.type} parameter needs low < high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step:
            raise ValueError("log and step cannot be combined (Optuna samples one or the other)")
        return self


def suggest(trial: Any, name: str, spec: ParamSpec) -> Any:
    """The trial's value for `name` from Optuna's suggest_* API."""
    if spec.type == "categorical":
        return trial.suggest_categorical(name, spec.choices)
    assert spec.low is not None and spec.high is not None  # checked by ParamSpec
    if spec.type == "int":
        return trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
    return trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)


def get_dotted(data: dict, key: str) -> Any:
    """data["optim"]["lr"] for "optim.lr" (a config as plain dicts)."""
    for part in key.split("."):
        data = data[part]
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    """data["optim"]["lr"] = value for "optim.lr", creating the nested dicts."""
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def write_plots(study: Any, out: Path, n_params: int) -> list[str]:
    """Optuna's own matplotlib plots as PNG: history, intermediate values, and importances (2+ params)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    makers = {"history.png": ovm.plot_optimization_history, "intermediate.png": ovm.plot_intermediate_values}
    if n_params > 1:
        makers["importances.png"] = ovm.plot_param_importances
    written = []
    for name, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = make(study)
            except (ValueError, RuntimeError):  # e.g. importances with a single complete trial
                continue
        figure = ax.get_figure(root=True)
        assert figure is not None
        figure.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(name)
    return written
