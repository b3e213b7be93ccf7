"""Helpers a from-scratch training loop calls where a reader expects the code (nanoGPT style), one idea each:

- `precision`: the autocast dtype (and why), autocast itself, seeds;
- `distributed`: joining torchrun's process group, this rank's device, collectives, DDP/FSDP wrapping;
- `checkpoints`: atomic save / rotate / resume, full state dicts under DDP and FSDP, RNG states;
- `optim`: AdamW with decay on matrices only, warmup + cosine learning rate;
- `metrics`: FLOPs per token, the measured matmul peak for MFU, the loss plot.

Who this process is (rank, world size, local rank) and its device and dtype live on the RunContext
(`ctx.setup_device`, `ctx.choose_dtype`); these modules read the process group torch already holds.
Torch is imported inside functions so importing them stays cheap.
"""
