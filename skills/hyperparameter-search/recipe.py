"""Hyperparameter search: an Optuna study over any skill's config fields, each trial one `skills run` of
that skill, bad trials pruned from the metrics they report while training, the study in SQLite so a
killed search resumes where it stopped.

Story: the search space (YAML, typed) and the base config are checked against the tuned skill's own Config
before anything runs -> the inputs the skill needs (data, tokenizer) are made once and shared by every
trial -> the study in <run>/study.db (Optuna's RDBStorage with heartbeats: trials of a killed search are
failed and retried with the same parameters) -> the default config as trial 0 (enqueued, so the search has
the baseline to beat) -> TPE-sampled trials, `n_jobs` at a time, each a subprocess whose metrics.jsonl is
reported to the median pruner -> the best trial, Optuna's plots (PNG), trials.json and report.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from skillbook.errors import ConfigError
from skillbook.ml.hpo import ParamSpec
from skillbook.run.recipe import RecipeConfig
from skillbook.run.runner import RunContext

OUTPUTS = {"config": "file", "trials": "dir", "report": "report"}
INPUTS: dict[str, str] = {}


class Config(RecipeConfig):
    """The defaults (with recipe.yaml): 10 trials of a 60-step tiny pretraining, two at a time, over lr and warmup."""

    skill: str = Field("pretraining", description="The skill whose config is searched (any skill with a recipe).")
    base: dict[str, Any] = Field(
        default_factory=dict,
        description="Fixed overrides of every trial (dotted keys allowed); the rest are the skill's defaults. "
        "recipe.yaml sets the tiny budget (60 steps, val loss every 10); `--set base.x=...` adds to it.",
    )
    space: dict[str, ParamSpec] = Field(
        default_factory=lambda: {
            "lr": ParamSpec(type="float", low=2e-3, high=2e-2, log=True),
            "warmup_steps": ParamSpec(type="int", low=0, high=30),
        },
        description="Searched fields (dotted keys for blocks, e.g. optim.lr): {type: float|int|categorical, "
        "low, high, log, step, choices}.",
    )
    metric: str = Field("final_val_loss", description="The summary key a trial is scored by.")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Whether lower or higher is better.")
    report_key: str | None = Field(
        "val_loss",
        description="The metrics.jsonl key reported to the pruner while a trial trains; None = no pruning.",
    )
    n_trials: int = Field(10, ge=1, description="Finished (complete or pruned) trials the study ends with.")
    n_jobs: int = Field(2, ge=1, description="Trials at once; the usable cores are split between them.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna's sampler (seeded).")
    pruner: Literal["median", "none"] = Field(
        "median", description="Median pruner: stop a trial worse than the median."
    )
    startup_trials: int = Field(3, ge=0, description="Trials that are never pruned and that TPE samples at random.")
    warmup_steps: int = Field(40, ge=0, description="Steps of each trial before it may be pruned.")
    include_default: bool = Field(True, description="Enqueue the default config as trial 0: the baseline to beat.")
    trial_timeout: float = Field(1800, gt=0, description="Seconds after which a trial is stopped and failed.")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: rerunning the same config continues its study (a killed search resumes)."
    )
    seed: int = Field(0, description="Seed of the sampler.")

    @model_validator(mode="after")
    def _some_space(self) -> Config:
        if not self.space:
            raise ValueError(
                "space: give at least one field to search, e.g. {lr: {type: float, low: 1e-4, high: 1e-2}}"
            )
        return self


def check_space(cfg: Config, ctx: RunContext) -> tuple[Any, dict]:
    """The tuned skill's recipe and its resolved base config; every searched value must pass its Config, so
    a typo or a bound outside the field's range fails here, not in trial 5."""
    from skillbook.ml.hpo import get_dotted, set_dotted
    from skillbook.run import recipe as recipe_mod

    if cfg.skill == "hyperparameter-search" or ctx.skills_dir is None:
        raise ConfigError("skill: a search cannot tune itself; name the skill whose config is searched")
    if not (ctx.skills_dir / cfg.skill / "recipe.py").is_file():
        raise ConfigError(f"skill: no skill named {cfg.skill!r} with a recipe; `skills list` shows them")
    rec = recipe_mod.load(ctx.skills_dir / cfg.skill)
    try:
        resolved = recipe_mod.resolve(rec, overrides=cfg.base).model_dump(mode="json")
    except ConfigError as err:
        raise ConfigError(f"base: {cfg.skill} refuses it: {' '.join(str(err).split())}") from None
    for name, spec in cfg.space.items():
        try:
            get_dotted(resolved, name)
        except (KeyError, TypeError):
            raise ConfigError(
                f"space: {name!r} is not a field of {cfg.skill}; see `skills schema {cfg.skill}`"
            ) from None
        for value in spec.choices or [spec.low, spec.high]:
            probe = json.loads(json.dumps(cfg.base))
            set_dotted(probe, name, int(value) if spec.type == "int" else value)
            try:
                recipe_mod.resolve(rec, overrides=probe)
            except ConfigError as err:  # the skill's own message, on one line
                raise ConfigError(
                    f"space: {cfg.skill} refuses {name}={value}: {' '.join(str(err).split())}; narrow low/high"
                ) from None
    return rec, resolved


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import warnings

    import optuna

    from skillbook.ml.hpo import get_dotted, set_dotted, suggest
    from skillbook.ml.subruns import TrialPrunedError, run_child, shared_inputs
    from skillbook.run.threads import usable_cores

    rec, resolved = check_space(cfg, ctx)

    # ---- inputs every trial shares (data, tokenizer): made once here, not once per trial -----------------
    base = shared_inputs(rec.INPUTS, cfg.base, ctx, cfg.seed)

    # ---- the study: SQLite in the run dir, heartbeats so a killed search's trials are retried ------------
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # Optuna's label, not ours
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{ctx.out_dir / 'study.db'}",
        # a live trial whose heartbeat thread is starved past the grace period (a loaded 2-core machine) is
        # failed and retried while it runs, and its own result can then no longer be told: keep a margin
        heartbeat_interval=2,
        grace_period=12,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
    sampler = (
        optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials)
        if cfg.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=cfg.seed)
    )
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_steps)
        if cfg.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=cfg.skill, storage=storage, sampler=sampler, pruner=pruner, direction=cfg.direction,
        load_if_exists=True,
    )  # fmt: skip
    states = optuna.trial.TrialState
    if any(t.state == states.RUNNING for t in study.get_trials(deepcopy=False)):
        import time

        time.sleep(storage.grace_period or 3)  # no live process holds this run dir (run lock): they are stale
        optuna.storages.fail_stale_trials(study)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (states.COMPLETE, states.PRUNED)]
    if finished:
        ctx.info(f"resuming the study: {len(finished)} of {cfg.n_trials} trials already finished")
    elif cfg.include_default:
        study.enqueue_trial({name: get_dotted(resolved, name) for name in cfg.space}, user_attrs={"default": True})

    # ---- one trial = one `skills run` subprocess, its metrics reported to the pruner --------------------
    threads = max(1, len(usable_cores()) // cfg.n_jobs)

    def objective(trial: optuna.Trial) -> float:
        config = json.loads(json.dumps(base))
        for name, spec in cfg.space.items():
            set_dotted(config, name, suggest(trial, name, spec))

        def report(step: int, value: float) -> bool:
            trial.report(value, step)
            return step >= cfg.warmup_steps and trial.should_prune()

        try:
            result = run_child(
                cfg.skill, config, ctx.out_dir / "trials" / f"{trial.number:03d}", cfg.report_key, report,
                threads, cfg.trial_timeout,
            )  # fmt: skip
        except TrialPrunedError as pruned:
            ctx.info(f"trial {trial.number} pruned at step {pruned.step}: {trial.params}")
            raise optuna.TrialPruned() from None
        value = result["summary"].get(cfg.metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise RuntimeError(f"metric: the {cfg.skill} summary has no number {cfg.metric!r}")
        ctx.log(step=trial.number, **{cfg.metric: value})
        ctx.info(f"trial {trial.number}: {cfg.metric}={value:.4f} {trial.params}")
        return float(value)

    # Queued trials (the default, a killed search's retries) run one at a time first: on SQLite two worker
    # threads can both pop the same WAITING trial and run it twice into one trial dir.
    waiting = sum(t.state == states.WAITING for t in study.get_trials(deepcopy=False))
    queued = min(waiting, cfg.n_trials - len(finished))
    if queued > 0:
        study.optimize(objective, n_trials=queued, n_jobs=1, catch=(RuntimeError,))
    remaining = cfg.n_trials - sum(
        t.state in (states.COMPLETE, states.PRUNED) for t in study.get_trials(deepcopy=False)
    )
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, n_jobs=cfg.n_jobs, catch=(RuntimeError,))
    return write_results(cfg, ctx, study)


def write_results(cfg: Config, ctx: RunContext, study: Any) -> dict[str, Path]:
    """trials.json, best_config.yaml (base + the best parameters), Optuna's plots and report.md."""
    import optuna
    import yaml

    from skillbook.ml.hpo import set_dotted, write_plots

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    if not complete:
        raise ConfigError(f"no trial of {cfg.skill} completed; see {ctx.out_dir / 'trials'}/*/log.txt")
    default = next((t for t in complete if t.user_attrs.get("default")), None)
    best = study.best_trial
    rows = [
        {"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
         "last_step": t.last_step, "default": bool(t.user_attrs.get("default"))}
        for t in trials
    ]  # fmt: skip
    (ctx.out_dir / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
    best_config = json.loads(json.dumps(cfg.base))
    for name, value in best.params.items():
        set_dotted(best_config, name, value)
    (ctx.out_dir / "best_config.yaml").write_text(yaml.safe_dump(best_config, sort_keys=False))
    plots = write_plots(study, ctx.out_dir, len(cfg.space))
    count = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    ctx.summary.update(
        best_value=best.value, best_params=best.params, best_trial=best.number,
        default_value=default.value if default else None, n_complete=count["COMPLETE"],
        n_pruned=count["PRUNED"], n_failed=count["FAIL"], plots=plots,
    )  # fmt: skip
    lines = [
        f"# hyperparameter-search: {cfg.skill}",
        "",
        f"{len(trials)} trials ({count['COMPLETE']} complete, {count['PRUNED']} pruned, {count['FAIL']} failed), "
        f"{cfg.sampler} sampler, {cfg.pruner} pruner, {cfg.n_jobs} at a time; {cfg.metric}, {cfg.direction} "
        f"(a pruned trial shows its last reported {cfg.report_key}).",
        "",
        f"- best: trial {best.number}, {cfg.metric} = {best.value:.4f}, {best.params}",
        f"- default: {cfg.metric} = {default.value:.4f}" if default else "- default: not in the study",
        "",
        "| trial | state | " + " | ".join(cfg.space) + f" | {cfg.metric} | last step |",
        "|---:|---|" + "---:|" * len(cfg.space) + "---:|---:|",
    ]
    for r in rows:
        params = " | ".join(f"{r['params'].get(k, ''):.4g}" if isinstance(r["params"].get(k), float)
                            else str(r["params"].get(k, "")) for k in cfg.space)  # fmt: skip
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        lines.append(
            f"| {r['number']}{' (default)' * r['default']} | {r['state']} | {params} | {value} | {r['last_step']} |"
        )
    lines += ["", *(f"![{p}]({p})" for p in plots)]
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[2:6]))
    return {
        "config": ctx.out_dir / "best_config.yaml",
        "trials": ctx.out_dir / "trials",
        "report": ctx.out_dir / "report.md",
    }
