"""The pipeline run report: stage metrics side by side, loss curves, samples and wall time."""

from __future__ import annotations

import json
from pathlib import Path

STAGE_METRICS = (
    "perplexity",
    "exact_match",
    "preference_accuracy",
    "win_rate",
    "mean_reward",
    "pairwise_accuracy",
    "model_params",
    "gguf_size_bytes",
    "bits_per_weight",
    "decode_tokens_per_s",
)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def loss_series(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from a step's metrics.jsonl, skipping records without both."""
    path = run_dir / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec.get("step"), int) and isinstance(rec.get("loss"), (int, float)):
                out.append((rec["step"], float(rec["loss"])))
    return out


def plot_losses(steps: list[dict], out: Path) -> Path | None:
    series = [(s["label"] or s["id"], loss_series(Path(s["run_dir"]))) for s in steps]
    series = [(name, pts) for name, pts in series if len(pts) > 1]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (name, pts) in zip(axes[0], series):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.4)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def stage_table(steps: list[dict]) -> list[str]:
    """Evaluation-like steps as columns, the metrics they share as rows."""
    stages = [s for s in steps if any(k in s["summary"] for k in STAGE_METRICS)]
    if not stages:
        return []
    rows = [k for k in STAGE_METRICS if any(k in s["summary"] for s in stages)]
    head = "| metric | " + " | ".join(s["label"] or s["id"] for s in stages) + " |"
    lines = [head, "|---|" + "---|" * len(stages)]
    lines += [f"| {k} | " + " | ".join(_fmt(s["summary"].get(k)) for s in stages) + " |" for k in rows]
    return lines


def samples_section(steps: list[dict]) -> list[str]:
    """The same held-out questions answered by each evaluated stage."""
    per_stage = []
    for s in steps:
        report = s["outputs"].get("report", {})
        data = _read_json(Path(report["path"])) if report.get("kind") == "eval-report" else {}
        samples = data.get("exact_match_samples") or data.get("samples") or []
        if samples and isinstance(samples[0], dict):
            per_stage.append((s["label"] or s["id"], samples))
    if not per_stage:
        return []
    lines = [
        "| prompt | expected | " + " | ".join(name for name, _ in per_stage) + " |",
        "|---|---|" + "---|" * len(per_stage),
    ]
    first = per_stage[0][1]
    for i, sample in enumerate(first[:5]):
        prompt = str(sample.get("prompt", "")).replace("\n", " ").replace("|", "\\|")
        answers = [str(smp[i].get("answer", "")) if i < len(smp) else "" for _, smp in per_stage]
        lines.append(
            f"| {prompt} | {str(sample.get('expected', '')).strip()} | "
            + " | ".join(a.replace("|", "\\|").replace("\n", " ") for a in answers)
            + " |"
        )
    return lines


def write_report(record_dir: Path, spec, record: dict) -> Path:
    steps = record["steps"]
    total = sum(s["seconds"] for s in steps)
    lines = [
        f"# Pipeline `{spec.name}`",
        "",
        spec.description.strip(),
        "",
        f"Status: **{record['status']}**. Step time {total:.1f} s (this invocation {record['seconds']:.1f} s; "
        "cached steps show the time they took when they ran).",
        "",
    ]
    table = stage_table(steps)
    if table:
        lines += ["## Stage metrics", "", *table, ""]
    plot = plot_losses(steps, record_dir / "loss_curves.png")
    if plot:
        lines += ["## Loss curves", "", f"![loss curves]({plot.name})", ""]
    samples = samples_section(steps)
    if samples:
        lines += ["## Sample answers", "", *samples, ""]
    lines += ["## Steps", "", "| step | skill | status | seconds | key |", "|---|---|---|---|---|"]
    lines += [f"| {s['id']} | {s['skill']} | {s['status']} | {s['seconds']:.1f} | `{s['key']}` |" for s in steps]
    other = [
        (s["id"], k, v)
        for s in steps
        for k, v in s["summary"].items()
        if k not in STAGE_METRICS and not isinstance(v, (dict, list))
    ]
    if other:
        lines += ["", "## Other step metrics", "", "| step | metric | value |", "|---|---|---|"]
        lines += [f"| {sid} | {k} | {_fmt(v)} |" for sid, k, v in other]
    out = record_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
