"""Mixture of experts on transformers' `MixtralForCausalLM`, one idea per module:

- `routing`: which experts each token is sent to (forward-hook counts, load statistics), the router
  losses, router optimizer groups, a collapsed-router init, total vs active parameters;
- `upcycling`: a dense Llama -> a Mixtral whose every expert is a copy of the dense MLP;
- `report`: the expert-load heat map and the moe recipe's report.md.

The 5.x layout they rely on: each decoder layer's `mlp` is a `MixtralSparseMoeBlock` whose `gate` (a
`MixtralTopKRouter`, weight [E, H], no bias) returns (logits, top-k weights, top-k indices), and whose
`experts` hold all expert MLPs fused in two 3-D tensors: `gate_up_proj` [E, 2I, H] (gate rows first, then
up rows) and `down_proj` [E, H, I]. Torch and transformers are imported inside functions.
"""
