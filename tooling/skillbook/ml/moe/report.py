"""The moe recipe's pictures and words: the expert-load heat map over training and report.md."""

from __future__ import annotations

from pathlib import Path

from skillbook.ml.moe.routing import load_entropy, utilization


def plot_load_heatmap(steps: list[int], loads: list[list[list[float]]], path: Path, title: str = "") -> Path:
    """One panel per layer: x = training step, y = expert, colour = load / uniform share (1 = fair).

    `loads[t][layer][expert]` is the fraction of assignments at logging point t.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arr = np.asarray(loads, dtype=float)  # [T, L, E]
    n_layers, n_experts = arr.shape[1], arr.shape[2]
    rel = arr * n_experts
    vmax = max(2.0, float(rel.max()))
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.0 + 0.45 * n_experts * n_layers), squeeze=False, sharex=True)
    for layer in range(n_layers):
        ax = axes[layer, 0]
        im = ax.imshow(
            rel[:, layer, :].T,
            aspect="auto",
            cmap="viridis",
            vmin=0.0,
            vmax=vmax,
            origin="lower",
            interpolation="nearest",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, n_experts - 0.5),
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.set_yticks(range(n_experts))
    axes[-1, 0].set_xlabel("training step")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="load / uniform share")
    fig.suptitle(title or "Expert load per layer over training")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_report(
    cfg: dict, counts: dict, evals: dict, final: list[list[float]], sample: str, plots: dict[str, str], model_dir: Path
) -> str:
    """Markdown: setup, MoE vs dense loss at equal steps, final routing per layer, verdict, sample, how to load."""
    k, e = cfg["top_k"], cfg["num_experts"]
    lines = [
        f"# MoE run: {e} experts, top-{k}, {cfg['init']}",
        "",
        "| model | total params | active params / token |",
        "|---|---|---|",
    ]
    for name, c in counts.items():
        lines.append(f"| {name} | {c['total']:,} | {c['active']:,} |")
    lines += [
        "",
        f"Same batches for both, {cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens; "
        f"aux-loss coef {cfg['aux_loss_coef']:g}, z-loss coef {cfg['z_loss_coef']:g}, jitter {cfg['router_jitter']:g}.",
        "",
        "## Validation loss at equal steps",
        "",
    ]
    names = list(evals)
    lines += [
        "| step | " + " | ".join(names) + (" | MoE - dense |" if "dense" in evals else " |"),
        "|---" * (len(names) + 1 + ("dense" in evals)) + "|",
    ]
    for i, (step, _) in enumerate(evals["moe"]):
        vals = [evals[n][i][1] for n in names]
        line = f"| {step} | " + " | ".join(f"{v:.4f}" for v in vals)
        lines.append(line + (f" | {vals[0] - vals[1]:+.4f} |" if "dense" in evals else " |"))
    lines += [
        "",
        f"![validation loss]({plots['loss']})",
        "",
        "## Routing (mean over the last 10% of steps)",
        "",
        "| layer | load per expert (1.00 = fair share) | utilization | load entropy |",
        "|---|---|---|---|",
    ]
    for layer, row in enumerate(final):
        rel = " ".join(f"{x * e:.2f}" for x in row)
        lines.append(f"| {layer} | {rel} | {utilization(row):.0%} | {load_entropy(row):.3f} |")
    worst = min(utilization(r) for r in final)
    verdict = (
        "balanced: every expert gets at least half its fair share in every layer"
        if worst == 1.0
        else f"IMBALANCED: in the worst layer only {worst:.0%} of experts get half their fair share; starved "
        f"experts waste parameters (raise aux_loss_coef, check router init, see references/router-collapse.md)"
    )
    lines += [
        "",
        f"Verdict: {verdict}.",
        "",
        f"![expert load heat map]({plots['heatmap']})",
        "",
        "Utilization = share of experts whose load is at least 0.5 x 1/E. Per-step values "
        "(loads, utilization, router entropy, aux loss / top_k) are in metrics.jsonl.",
        "",
        "## The saved model",
        "",
        f"Reloaded with AutoModelForCausalLM and continued greedily: `{sample}`",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})",
        f"tok = AutoTokenizer.from_pretrained({str(model_dir)!r})",
        "```",
        "",
    ]
    return "\n".join(lines)
