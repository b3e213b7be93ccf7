"""Mixture-of-experts helpers: routing statistics, router losses, upcycling a dense Llama, load heat maps.

Everything is built around transformers' `MixtralForCausalLM` (5.x layout): each decoder layer's
`mlp` is a `MixtralSparseMoeBlock` whose `gate` (a `MixtralTopKRouter`, weight [E, H], no bias)
returns (logits, top-k weights, top-k indices), and whose `experts` hold all expert MLPs fused in two
3-D tensors: `gate_up_proj` [E, 2I, H] (gate rows first, then up rows) and `down_proj` [E, H, I].
Counting is done from the router's own top-k choices (forward hooks), not inferred from the aux loss.
Torch and transformers are imported inside functions so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from skillbook.errors import SkillbookError

# ---------------------------------------------------------------------------------------------
# Routing statistics: counts of top-k choices per layer and expert
# ---------------------------------------------------------------------------------------------


def routers(model) -> list:
    """The router (`mlp.gate`) of every MoE layer, in layer order."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    found = [m for m in model.modules() if isinstance(m, MixtralTopKRouter)]
    if not found:
        raise SkillbookError("no Mixtral router found in the model; routing statistics need a MixtralForCausalLM")
    return found


class RoutingCounter:
    """Forward hooks on every router that count which experts each token was sent to.

    `counts` is a float tensor [layers, experts] of top-k assignments since the last `reset()`;
    `entropy_sum`/`tokens` give the mean per-token router entropy. Use as a context manager, or call
    `remove()` when done (hooks left behind slow every later forward down).
    """

    def __init__(self, model):
        import torch

        self.gates = routers(model)
        self.num_experts = self.gates[0].num_experts
        self.top_k = self.gates[0].top_k
        self.counts = torch.zeros(len(self.gates), self.num_experts)
        self.entropy_sum = torch.zeros(len(self.gates))
        self.tokens = 0
        self._handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]

    def _hook(self, layer: int):
        def hook(module, args, output) -> None:
            import torch

            logits, _, indices = output  # the indices the experts actually received
            with torch.no_grad():
                flat = indices.reshape(-1).cpu()
                self.counts[layer] += torch.bincount(flat, minlength=self.num_experts).float()
                logp = torch.log_softmax(logits.float(), dim=-1)
                self.entropy_sum[layer] += -(logp.exp() * logp).sum(-1).sum().cpu()
                if layer == 0:
                    self.tokens += logits.shape[0]

        return hook

    def reset(self) -> None:
        self.counts.zero_()
        self.entropy_sum.zero_()
        self.tokens = 0

    def loads(self) -> list[list[float]]:
        """Fraction of assignments each expert received, per layer (each row sums to 1)."""
        return load_fractions(self.counts)

    def router_entropy(self) -> list[float]:
        """Mean per-token router entropy per layer, divided by ln(E): 1 = uniform router, 0 = one-hot."""
        n = max(self.tokens, 1)
        return [float(e) / n / math.log(self.num_experts) for e in self.entropy_sum]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> RoutingCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def load_fractions(counts) -> list[list[float]]:
    """Counts [layers, experts] -> per-layer fractions of all top-k assignments (rows sum to 1)."""
    rows = []
    for row in counts.tolist():
        total = sum(row)
        rows.append([c / total if total else 0.0 for c in row])
    return rows


def utilization(load: list[float], threshold: float = 0.5) -> float:
    """Share of experts whose load is at least `threshold` x the uniform share 1/E (1.0 = none starved)."""
    uniform = 1.0 / len(load)
    return sum(x >= threshold * uniform for x in load) / len(load)


def load_entropy(load: list[float]) -> float:
    """Entropy of one layer's load distribution divided by ln(E): 1 = perfectly balanced, 0 = one expert."""
    h = -sum(x * math.log(x) for x in load if x > 0)
    return h / math.log(len(load))


def drop_fraction(counts_row: list[float], capacity_factor: float, top_k: int) -> float:
    """Share of assignments a capacity-limited router (Switch, GShard) would drop in this batch.

    capacity per expert = capacity_factor x tokens x top_k / E; everything above it overflows.
    """
    total = sum(counts_row)
    if total == 0:
        return 0.0
    capacity = capacity_factor * total / len(counts_row)
    return sum(max(0.0, c - capacity) for c in counts_row) / total


def routing_stats(counts, entropy: list[float], capacity_factor: float, top_k: int) -> dict[str, Any]:
    """One log record of routing statistics from a [layers, experts] count tensor."""
    loads = load_fractions(counts)
    util = [utilization(row) for row in loads]
    return {
        "utilization_min": min(util),
        "utilization": util,
        "load_entropy_min": min(load_entropy(row) for row in loads),
        "router_entropy": sum(entropy) / len(entropy),
        "max_load_ratio": max(max(row) * len(row) for row in loads),  # 1.0 = no expert above its fair share
        "drop_fraction": max(drop_fraction(r, capacity_factor, top_k) for r in counts.tolist()),
        "loads": [[round(x, 4) for x in row] for row in loads],
    }


# ---------------------------------------------------------------------------------------------
# Router losses
# ---------------------------------------------------------------------------------------------


def per_layer_aux_loss(router_logits, num_experts: int, top_k: int) -> Any:
    """Switch/GShard load-balancing loss computed per layer and averaged (= top_k when balanced).

    transformers' `aux_loss` pools the routed fractions f and mean probabilities P over all layers
    before multiplying, so opposite imbalances in two layers cancel: layer 0 sending everything to
    experts {0, 3} and layer 1 to {1, 2} scores as perfectly balanced and gets no balancing gradient.
    Calling the same function once per layer restores the per-layer definition of the papers.
    """
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return torch.stack([load_balancing_loss_func((l,), num_experts, top_k) for l in router_logits]).mean()


def router_z_loss(router_logits) -> Any:
    """ST-MoE z-loss: mean over tokens (and layers) of logsumexp(router logits)^2; keeps logits small."""
    import torch

    per_layer = [torch.logsumexp(l.float(), dim=-1).pow(2).mean() for l in router_logits]
    return torch.stack(per_layer).mean()


def adamw_router_scaled(model, lr: float, weight_decay: float, betas: tuple[float, float], router_lr_scale: float):
    """AdamW with the routers in their own group at `router_lr_scale` x lr and no weight decay.

    Adam moves every weight by ~lr per step whatever its gradient scale; a router's logits are small
    at init, so at a full learning rate the top-k choice of every token can flip from one step to the
    next. Each group carries `lr_scale`; the training loop sets `lr = schedule(step) * lr_scale`.
    """
    import torch

    router_ids = {id(g.weight) for g in routers(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    router = [p for p in params if id(p) in router_ids]
    decay = [p for p in params if id(p) not in router_ids and p.dim() >= 2]
    no_decay = [p for p in params if id(p) not in router_ids and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": router, "weight_decay": 0.0, "lr_scale": router_lr_scale},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ---------------------------------------------------------------------------------------------
# Router initialisation that favours one expert (to demonstrate and test collapse detection)
# ---------------------------------------------------------------------------------------------


def favour_expert(model, expert: int, scale: float, channel: int = 0) -> None:
    """Make every router prefer `expert` for every token, as a collapsed router does.

    Mixtral's router is a bias-free linear map, and at init the hidden states have no common direction,
    so no row of router weights alone can win for every token. We give the embeddings one shared
    positive channel (like the large constant activations real LMs grow) and point the favoured
    expert's router row along it: its logit becomes ~scale x sqrt(H) for every token.
    """
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[:, channel] = 1.0
        for gate in routers(model):
            gate.weight[:, channel] = 0.0
            gate.weight[expert, channel] = scale


# ---------------------------------------------------------------------------------------------
# Upcycling: a dense Llama -> a Mixtral whose every expert is a copy of the dense MLP
# ---------------------------------------------------------------------------------------------

_SHARED_CONFIG = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
)


def check_upcycle_source(ref: str | Path) -> Path | str:
    """Refuse anything but a bias-free Llama as upcycling source, before any data or weights are touched.

    A local directory is checked through its config.json; a hub id through AutoConfig (online only).
    """
    path = Path(ref).expanduser()
    if path.exists():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise SkillbookError(
                f"dense_model: {path} has no config.json; pass an hf-model directory (the "
                f"'model' output of `skills run pretraining`)"
            )
        cfg, where = json.loads(cfg_file.read_text()), cfg_file
    else:
        from transformers import AutoConfig

        cfg, where = AutoConfig.from_pretrained(str(ref)).to_dict(), str(ref)
    kind = cfg.get("model_type")
    if kind != "llama":
        raise SkillbookError(
            f"dense_model: upcycling needs a Llama-architecture model (model_type 'llama'), got "
            f"{kind!r} from {where}; only a Llama MLP (gate/up/down) maps exactly onto Mixtral's "
            f"experts. Use init=scratch, or upcycle a Llama checkpoint"
        )
    if cfg.get("mlp_bias") or cfg.get("attention_bias"):
        raise SkillbookError(
            "dense_model: the Llama uses biases (mlp_bias/attention_bias), which Mixtral has no "
            "place for; upcycle a bias-free Llama or use init=scratch"
        )
    return path if path.exists() else str(ref)


def mixtral_config_from_llama(dense_cfg, num_experts: int, top_k: int, **moe_kwargs):
    """A MixtralConfig with the dense model's shape, plus the MoE settings."""
    from transformers import MixtralConfig

    shared = {k: getattr(dense_cfg, k) for k in _SHARED_CONFIG if getattr(dense_cfg, k, None) is not None}
    return MixtralConfig(
        **shared, num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None, **moe_kwargs
    )


def upcycle(dense, num_experts: int, top_k: int, seed: int = 0, **moe_kwargs):
    """Sparse upcycling (Komatsuzaki et al. 2022): every expert starts as an exact copy of the dense MLP.

    Mixtral renormalises the top-k router weights to sum to 1, so k identical experts give exactly the
    dense MLP's output: the upcycled model computes the dense model's function at step 0, whatever the
    (random) router says. Attention, norms, embeddings and head are copied unchanged.
    """
    import torch
    from transformers import MixtralForCausalLM

    if dense.config.model_type != "llama":
        raise SkillbookError(f"dense_model: upcycling needs a Llama model, got {dense.config.model_type!r}")
    torch.manual_seed(seed)  # the only new weights are the routers
    moe = MixtralForCausalLM(mixtral_config_from_llama(dense.config, num_experts, top_k, **moe_kwargs))
    moe = moe.to(dense.dtype)
    src = dense.state_dict()
    dst = moe.state_dict()
    new = {}
    for name, value in src.items():
        if ".mlp." not in name:
            new[name] = value
    for i in range(dense.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate_up = torch.cat([src[p + "gate_proj.weight"], src[p + "up_proj.weight"]], dim=0)  # [2I, H]
        new[p + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        new[p + "experts.down_proj"] = src[p + "down_proj.weight"].unsqueeze(0).repeat(num_experts, 1, 1)
        new[p + "gate.weight"] = dst[p + "gate.weight"]  # keep the fresh router init
    missing, unexpected = moe.load_state_dict(new, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not moe.config.tie_word_embeddings]
    if missing or unexpected:
        raise SkillbookError(f"upcycling: weights did not map (missing {missing[:4]}, unexpected {unexpected[:4]})")
    if moe.config.tie_word_embeddings:
        moe.tie_weights()
    return moe


# ---------------------------------------------------------------------------------------------
# Parameter counts: total vs active per token
# ---------------------------------------------------------------------------------------------


def param_counts(model) -> dict[str, int]:
    """Total parameters and parameters active per token (non-expert + top_k experts' share)."""
    seen, total, expert = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embedding / head counted once
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name:
            expert += p.numel()
    cfg = model.config
    e = getattr(cfg, "num_local_experts", None)
    active = total if not e else total - expert + expert * cfg.num_experts_per_tok // e
    return {"total": total, "active": active}


# ---------------------------------------------------------------------------------------------
# Heat map of expert load per layer over training
# ---------------------------------------------------------------------------------------------


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


def plot_loss_curves(curves: dict[str, tuple[list[int], list[float]]], path: Path, ylabel: str) -> Path:
    """Overlay loss curves (name -> (steps, values)) on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------


def final_loads(loads: list[list[list[float]]], share: float = 0.1) -> list[list[float]]:
    """Mean per-layer load over the last `share` of logged steps (one step is too noisy to judge)."""
    tail = loads[-max(1, int(len(loads) * share)) :]
    n_layers, n_experts = len(tail[0]), len(tail[0][0])
    return [[sum(t[layer][e] for t in tail) / len(tail) for e in range(n_experts)] for layer in range(n_layers)]


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
        row = f"| {step} | " + " | ".join(f"{v:.4f}" for v in vals)
        lines.append(row + (f" | {vals[0] - vals[1]:+.4f} |" if "dense" in evals else " |"))
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
