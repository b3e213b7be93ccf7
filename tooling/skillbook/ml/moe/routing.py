"""Routing: counts of the router's own top-k choices per layer and expert (forward hooks, not inferred from
the aux loss), load statistics, the Switch and z router losses, router optimizer groups, a router init that
favours one expert (to demonstrate collapse), and total vs active parameter counts.
"""

from __future__ import annotations

import math
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


def final_loads(loads: list[list[list[float]]], share: float = 0.1) -> list[list[float]]:
    """Mean per-layer load over the last `share` of logged steps (one step is too noisy to judge)."""
    tail = loads[-max(1, int(len(loads) * share)) :]
    n_layers, n_experts = len(tail[0]), len(tail[0][0])
    return [[sum(t[layer][e] for t in tail) / len(tail) for e in range(n_experts)] for layer in range(n_layers)]


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

    per_layer: list[Any] = [load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits]
    return torch.stack(per_layer).mean()


def router_z_loss(router_logits) -> Any:
    """ST-MoE z-loss: mean over tokens (and layers) of logsumexp(router logits)^2; keeps logits small."""
    import torch

    per_layer = [torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in router_logits]
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
