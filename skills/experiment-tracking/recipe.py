"""Experiment tracking: run a skill a few times with `tracking` on, read every run back with TensorBoard's
and MLflow's own readers, check that they hold exactly what metrics.jsonl holds, and compare the runs side
by side from the MLflow store.

Story: the variants (a list of overrides of one skill, e.g. two learning rates) -> the inputs they share
made once -> each variant one `skills run <skill>` subprocess with tracking.tensorboard and tracking.mlflow
on, all into one MLflow experiment in <run>/mlflow.db -> per run: metrics.jsonl vs TensorBoard's
EventAccumulator vs MlflowClient.get_metric_history, point by point -> the runs ranked by MLflow's
search_runs, their curves (read from the event files) in one PNG -> tracking.json, report.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from skillbook.errors import ConfigError
from skillbook.run.recipe import RecipeConfig
from skillbook.run.runner import RunContext

OUTPUTS = {"store": "file", "runs": "dir", "report": "report"}
INPUTS: dict[str, str] = {}


class Config(RecipeConfig):
    """The defaults (with recipe.yaml): the tiny pretraining at two learning rates, 40 steps each."""

    skill: str = Field("pretraining", description="The skill every variant runs.")
    base: dict[str, Any] = Field(
        default_factory=dict, description="Overrides shared by every variant (recipe.yaml: the tiny budget)."
    )
    variants: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"lr": 6e-3}, {"lr": 1.5e-3}],
        description="One run per entry: its overrides on top of base (dotted keys as nested dicts).",
    )
    keys: list[str] = Field(["loss", "val_loss"], description="metrics.jsonl keys compared with the trackers.")
    rank_by: str = Field("val_loss", description="The MLflow metric (latest value) the runs are ranked by.")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Whether lower rank_by is better.")
    seed: int = Field(0, description="Seed of the shared data.")

    @model_validator(mode="after")
    def _some_variants(self) -> Config:
        if not self.variants:
            raise ValueError("variants: give at least one run, e.g. [{lr: 0.006}, {lr: 0.002}]")
        if self.rank_by not in self.keys:
            raise ValueError(f"rank_by: {self.rank_by!r} must be one of keys {self.keys}")
        return self


def jsonl_series(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value of `key` in a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {int(r["step"]): float(r[key]) for r in rows if key in r and r.get("step") is not None}


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from skillbook.ml.hpo import set_dotted
    from skillbook.ml.subruns import run_child, shared_inputs
    from skillbook.run import recipe as recipe_mod
    from skillbook.run.threads import usable_cores

    # ---- every variant must be a valid config of the skill before anything runs ------------------------
    if ctx.skills_dir is None or not (ctx.skills_dir / cfg.skill / "recipe.py").is_file():
        raise ConfigError(f"skill: no skill named {cfg.skill!r} with a recipe; `skills list` shows them")
    rec = recipe_mod.load(ctx.skills_dir / cfg.skill)
    uri = f"sqlite:///{(ctx.out_dir / 'mlflow.db').resolve()}"
    tracking = {"tensorboard": True, "mlflow": True, "mlflow_uri": uri, "experiment": cfg.skill}
    configs = []
    for i, variant in enumerate(cfg.variants):
        config = json.loads(json.dumps(cfg.base))
        for key, value in variant.items():
            set_dotted(config, key, value)
        config["tracking"] = tracking
        try:
            recipe_mod.resolve(rec, overrides=config)
        except ConfigError as err:
            raise ConfigError(f"variants[{i}]: {cfg.skill} refuses it: {' '.join(str(err).split())}") from None
        configs.append(config)

    # ---- the runs: one subprocess each, all logging into one MLflow experiment --------------------------
    base = shared_inputs(rec.INPUTS, cfg.base, ctx, cfg.seed)  # + the corpus/tokenizer base does not give
    threads = len(usable_cores())
    runs = []
    for i, config in enumerate(configs):
        result = run_child(cfg.skill, {**base, **config}, ctx.out_dir / "runs" / f"{i:02d}", threads=threads)
        runs.append(Path(result["run_dir"]))
        ctx.info(f"run {i} {cfg.variants[i]}: {Path(result['run_dir']).name}")

    # ---- read back with each tool's own reader; compare point by point with metrics.jsonl ---------------
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.skill)
    assert experiment is not None
    by_name = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    checks, curves = [], {}
    for i, run_dir in enumerate(runs):
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        mlflow_run = by_name[run_dir.name]
        for key in cfg.keys:
            ours = jsonl_series(run_dir, key)
            board = {e.step: e.value for e in events.Scalars(key)}
            flow = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, key)}
            checks.append(
                {
                    "run": i,
                    "key": key,
                    "points": len(ours),
                    "same_steps": sorted(ours) == sorted(board) == sorted(flow),
                    "tensorboard_max_rel_diff": max(abs(board[s] - v) / max(abs(v), 1e-12) for s, v in ours.items()),
                    "mlflow_max_abs_diff": max(abs(flow[s] - v) for s, v in ours.items()),
                }
            )
            curves[(i, key)] = sorted(board.items())

    # ---- side by side: MLflow ranks the runs by their latest rank_by ---------------------------------------
    order = "ASC" if cfg.direction == "minimize" else "DESC"
    ranked = client.search_runs([experiment.experiment_id], order_by=[f"metrics.{cfg.rank_by} {order}"])
    table = [
        {
            "run": runs.index(next(p for p in runs if p.name == r.info.run_name)),
            "name": r.info.run_name,
            "status": r.info.status,
            **{k: r.data.metrics.get(k) for k in cfg.keys},
        }
        for r in ranked
    ]
    plot_curves(curves, cfg, ctx.out_dir / "curves.png")
    (ctx.out_dir / "tracking.json").write_text(json.dumps({"checks": checks, "ranked": table}, indent=2) + "\n")
    ctx.summary.update(
        runs=len(runs),
        points_compared=sum(c["points"] for c in checks),
        same_steps=all(c["same_steps"] for c in checks),
        tensorboard_max_rel_diff=max(c["tensorboard_max_rel_diff"] for c in checks),
        mlflow_max_abs_diff=max(c["mlflow_max_abs_diff"] for c in checks),
        best_run=table[0]["run"],
        **{f"best_{cfg.rank_by}": table[0][cfg.rank_by]},
    )
    write_report(cfg, ctx, checks, table)
    return {"store": ctx.out_dir / "mlflow.db", "runs": ctx.out_dir / "runs", "report": ctx.out_dir / "report.md"}


def plot_curves(curves: dict, cfg: Config, path: Path) -> None:
    """Each key's curve per run, as TensorBoard stored it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.keys), figsize=(5 * len(cfg.keys), 3.5), squeeze=False)
    for (i, key), points in curves.items():
        ax = axes[0][cfg.keys.index(key)]
        ax.plot([s for s, _ in points], [v for _, v in points], label=f"run {i}: {cfg.variants[i]}")
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(cfg: Config, ctx: RunContext, checks: list[dict], table: list[dict]) -> None:
    s = ctx.summary
    lines = [
        f"# experiment-tracking: {cfg.skill}",
        "",
        f"{s['runs']} runs, {s['points_compared']} points compared; every point at the same step in "
        f"metrics.jsonl, TensorBoard and MLflow: {s['same_steps']}; largest difference: TensorBoard "
        f"{s['tensorboard_max_rel_diff']:.1e} relative (it stores float32), MLflow {s['mlflow_max_abs_diff']:.1e}.",
        "",
        f"Ranked by MLflow (`search_runs(order_by=['metrics.{cfg.rank_by}'])`, latest values):",
        "",
        "| rank | run | overrides | status | " + " | ".join(cfg.keys) + " |",
        "|---:|---:|---|---|" + "---:|" * len(cfg.keys),
    ]
    for rank, row in enumerate(table, 1):
        values = " | ".join(f"{row[k]:.4f}" if row[k] is not None else "-" for k in cfg.keys)
        lines.append(f"| {rank} | {row['run']} | `{cfg.variants[row['run']]}` | {row['status']} | {values} |")
    lines += [
        "",
        "![curves](curves.png)",
        "",
        f"Browse: `mlflow ui --backend-store-uri sqlite:///{ctx.out_dir / 'mlflow.db'}`",
    ]
    lines += [f"and `tensorboard --logdir {ctx.out_dir / 'runs'}`."]
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[2:3] + lines[6:-4]))
