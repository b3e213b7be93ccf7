"""Pretraining: train a Llama-style decoder from scratch on a corpus, in a plain PyTorch loop (nanoGPT style).

The model is transformers' LlamaForCausalLM built from a LlamaConfig (random init), so the output is an
hf-model that AutoModelForCausalLM loads. The loop: AdamW with weight decay on matrices only, linear
warmup + cosine decay, gradient accumulation that keeps the global batch when the process count changes,
clipping, bf16 autocast where the hardware has fast bf16, optional torch.compile, periodic validation,
atomic checkpoints that `resume=auto` continues exactly, DDP/FSDP under torchrun, MFU against a measured
matmul peak, and greedy samples at the end.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from skillbook.errors import ConfigError
from skillbook.ml import lm_data
from skillbook.ml.data_files import CorpusPath, corpus_sources
from skillbook.ml.training import checkpoints, distributed, metrics, optim, precision
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "hf-model"}
INPUTS = {"corpus": "corpus", "tokenizer": "tokenizer"}


class Config(RecipeConfig):
    """The defaults are the CPU-tiny run: a 1M-parameter Llama (4 x 128, 2 heads) on the embedded synthetic
    world, ~90 s on 2 CPU cores. 300 steps at a high, barely-decayed LR: the model learns the world's facts
    (cloze accuracy ~0.99), not just its grammar. The presets in configs/ scale it to GPUs."""

    corpus: CorpusPath | None = Field(
        None,
        description='Corpus: a folder (train.jsonl, val.jsonl of {"text"}), or one .jsonl/.json/.parquet file of '
        "{text} rows or a .txt file (a document per blank-line-separated paragraph), split by val_fraction; "
        "None = the embedded synthetic world.",
    )
    val_fraction: float = Field(
        0.05, gt=0, le=0.5, description="Share of a single corpus file held out for validation (seeded by seed)."
    )
    tokenizer: str | None = Field(
        None,
        description="HF tokenizer dir (or an hf-model dir); None = train one with the tokenization skill's defaults.",
    )
    # ---- model: a LlamaConfig --------------------------------------------------------------------
    n_layer: int = Field(4, ge=1, description="Decoder blocks (num_hidden_layers).")
    d_model: int = Field(128, ge=16, description="Hidden size; must be n_head x an even head_dim.")
    n_head: int = Field(2, ge=1, description="Attention heads; head_dim = d_model / n_head (64-128 on GPUs).")
    n_kv_head: int | None = Field(
        None, ge=1, description="Key/value heads; None = n_head (multi-head), fewer = grouped-query attention."
    )
    ffn_hidden: int | None = Field(
        None, ge=16, description="SwiGLU hidden size; None = 8/3 x d_model rounded up to a multiple of 64."
    )
    seq_len: int = Field(128, ge=8, description="Training context length in tokens (also max_position_embeddings).")
    vocab_size: int | None = Field(
        None, ge=8, description="Expected tokenizer size; None = len(tokenizer). A mismatch fails before training."
    )
    pad_vocab_to: int = Field(
        1, ge=1, description="Round embedding rows up to a multiple of this (64 or 128 on GPUs: faster matmuls)."
    )
    tie_embeddings: bool = Field(
        True, description="Share the input embedding with the output head (saves vocab x d_model params)."
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base; raise it (500000 in Llama 3) for long contexts.")
    # ---- optimisation ----------------------------------------------------------------------------
    max_steps: int = Field(300, ge=1, description="Optimizer steps; tokens seen = max_steps x total_batch_tokens.")
    total_batch_tokens: int = Field(
        2048,
        ge=8,
        description="Tokens per optimizer step over all processes and accumulation steps (kept when the process "
        "count changes).",
    )
    batch_size: int = Field(
        16, ge=1, description="Largest micro-batch (sequences per process per forward); accumulation makes up the rest."
    )
    lr: float = Field(
        6e-3,
        gt=0,
        description="Peak learning rate (~6e-3 at 1M params, 3e-3 for 3-10M, 6e-4 at 125M, 3e-4 at 350M-1B).",
    )
    min_lr_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Cosine decay ends at lr x min_lr_ratio. 0.5: the tiny default's 300 steps learn facts fastest "
        "at a high LR; 0.1 for long runs (the GPU presets).",
    )
    warmup_steps: int = Field(
        30, ge=0, description="Linear warmup steps (~1-10% of max_steps; Adam's second moments need them)."
    )
    weight_decay: float = Field(
        0.1, ge=0, description="Decoupled AdamW weight decay on 2-D weights only (not norms or biases)."
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.95), description="AdamW betas; beta2=0.95 is steadier than 0.999 for LM pretraining."
    )
    grad_clip: float = Field(
        1.0, ge=0, description="Clip the global gradient norm to this; 0 = no clipping (the norm is still logged)."
    )
    # ---- systems ---------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when a GPU is visible, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Autocast dtype; auto = bf16 on bf16 GPUs and on native-bf16 CPUs (AVX512-BF16/AMX) for models "
        "of 5M+ params, else fp32; SKILLBOOK_AUTO_DTYPE overrides auto.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the model; auto = on for CUDA, and on CPU from 5M params (with deterministic "
        "kernels); below that compiling costs more time than it saves.",
    )
    fused_adamw: bool = Field(
        True, description="Fused AdamW kernel (same update as the default, fewer kernel launches)."
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: ddp = full replicas, fsdp = FSDP2 sharding per block (GPUs, big models)."
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s per process for MFU (e.g. 989e12 for H100 bf16 dense); None = measure with a "
        "matmul probe.",
    )
    # ---- evaluation, checkpoints, samples --------------------------------------------------------
    eval_interval: int = Field(
        100, ge=1, description="Validation loss every this many steps (and at the start and the end)."
    )
    eval_windows: int = Field(32, ge=1, description="Validation windows of seq_len tokens per evaluation.")
    checkpoint_interval: int = Field(100, ge=1, description="Save a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest K checkpoints.")
    resume: Literal["auto", "never"] = Field(
        "never", description="auto = continue the unfinished run with the same config from its latest checkpoint."
    )
    sample_prompts: list[str] | None = Field(
        None, description="Prompts for greedy samples in report.md; None = openings of validation documents."
    )
    sample_tokens: int = Field(24, ge=1, description="New tokens per sample.")
    seed: int = Field(0, description="Seed for init, data order and the default data.")

    @model_validator(mode="after")
    def _shapes(self) -> Config:
        kv = self.n_kv_head or self.n_head
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must be n_head ({self.n_head}) x an even head_dim (RoPE rotates pairs)"
            )
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({kv})")
        if self.total_batch_tokens % self.seq_len:
            raise ValueError(
                f"total_batch_tokens ({self.total_batch_tokens}) must be a multiple of seq_len ({self.seq_len})"
            )
        return self


def llama_config(cfg: Config, vocab: int, bos: int | None = None, eos: int | None = None, pad: int | None = None):
    """The transformers LlamaConfig for these settings (SwiGLU, RMSNorm, RoPE, no biases)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        intermediate_size=cfg.ffn_hidden or math.ceil(8 * cfg.d_model / 3 / 64) * 64,
        max_position_embeddings=cfg.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=False,
    )


def check_vocab(cfg: Config, tok, where):
    """The tokenizer, if its size matches an explicit `vocab_size` (None = take len(tokenizer))."""
    if cfg.vocab_size is not None and cfg.vocab_size != len(tok):
        raise ConfigError(
            f"vocab_size: the config says {cfg.vocab_size} but the tokenizer at {where} has {len(tok)} "
            f"tokens; drop vocab_size (it defaults to len(tokenizer)) or pass the matching tokenizer"
        )
    return tok


def get_inputs(cfg: Config, ctx: RunContext) -> tuple[Path, Path]:
    """Corpus and tokenizer dirs: given ones as they are; missing ones are made inside the run dir."""
    corpus = Path(cfg.corpus) if cfg.corpus else ctx.out_dir / "data" / "corpus"
    if cfg.corpus is None and ctx.is_main:
        from skillbook.ml.synthetic import write_default_data

        write_default_data(ctx.out_dir / "data", cfg.seed)
        ctx.info(f"no corpus given: wrote the embedded synthetic world to {corpus}")
    distributed.barrier()  # the other ranks read what rank 0 wrote
    if cfg.tokenizer:
        return corpus, Path(cfg.tokenizer)
    # the tokenization skill with its own defaults, on our corpus, into run_dir/tokenization/
    tok = ctx.run_skill("tokenization", {"corpus": str(corpus), "seed": cfg.seed, "val_fraction": cfg.val_fraction})
    ctx.info("no tokenizer given: trained one with the tokenization skill")
    return corpus, Path(tok["outputs"]["tokenizer"]["path"])


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    """Build, train, checkpoint, evaluate and save a Llama-style causal LM."""
    import torch
    import torch.nn.functional as F
    from transformers import GenerationConfig, LlamaForCausalLM

    from skillbook.ml.tokenizer_utils import load_tokenizer

    # ---- fail fast: input paths and the batch split, before any process group, data or model -----
    if cfg.corpus:
        artifact_path(cfg.corpus, "corpus")
    if cfg.tokenizer:
        check_vocab(cfg, load_tokenizer(artifact_path(cfg.tokenizer, "tokenizer")), cfg.tokenizer)
    # micro-batch x accumulation x processes = total_batch_tokens / seq_len, for any process count
    seqs_per_rank, rem = divmod(cfg.total_batch_tokens // cfg.seq_len, ctx.world_size)
    if rem or seqs_per_rank == 0:
        raise ConfigError(
            f"total_batch_tokens: {cfg.total_batch_tokens // cfg.seq_len} sequences per step do not split over "
            f"{ctx.world_size} processes; make total_batch_tokens / seq_len a multiple of the process count"
        )
    micro = max(b for b in range(1, min(cfg.batch_size, seqs_per_rank) + 1) if seqs_per_rank % b == 0)
    accum = seqs_per_rank // micro

    # ---- process group and device (under torchrun), data, tokenizer (rank 0 makes missing ones) ----------
    device = ctx.setup_device(cfg.device)
    corpus, tok_dir = get_inputs(cfg, ctx)
    tok = check_vocab(cfg, load_tokenizer(tok_dir), tok_dir)
    train_texts, val_texts, note = corpus_sources(corpus, "corpus", cfg.val_fraction, cfg.seed)  # one split rule
    ctx.info(note)
    data = lm_data.load_tokens({"train": train_texts, "val": val_texts}, tok, cfg.seq_len)

    # ---- model: random init, seeded identically on every rank; optimizer; FLOPs -----------------------
    precision.seed_everything(cfg.seed)
    vocab = math.ceil(len(tok) / cfg.pad_vocab_to) * cfg.pad_vocab_to
    raw = LlamaForCausalLM(llama_config(cfg, vocab, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)).to(device)
    n_params = sum(p.numel() for p in raw.parameters())
    dtype, dtype_reason = ctx.choose_dtype(cfg.dtype, n_params)
    # compile: on CUDA always; on CPU only in fp32 from 5M params, where it amortises, with deterministic kernels
    use_compile, compile_reason = precision.choose_compile(cfg.compile, device, n_params, dtype)
    if use_compile and device == "cpu":
        precision.deterministic_compiled_cpu()
    if cfg.parallel == "fsdp":  # wrapping is a no-op in a single process
        distributed.wrap_model(raw, device, "fsdp")  # in place: raw's parameters become shards
    model = torch.compile(raw) if use_compile else raw  # inputs never change shape: one graph, no recompiles
    if cfg.parallel == "ddp":
        model = distributed.wrap_model(model, device, "ddp")
    optimizer = optim.adamw(raw, cfg.lr, cfg.weight_decay, cfg.betas, fused=cfg.fused_adamw)
    fpt = metrics.flops_per_token(n_params, cfg.n_layer, cfg.d_model, cfg.seq_len)
    peak = cfg.peak_flops or metrics.measure_peak_flops(device, dtype)
    ctx.info(
        f"{n_params / 1e6:.2f}M params, vocab {vocab}, {cfg.n_layer}x{cfg.d_model}, "
        f"{len(data['train'])} train tokens; step = {ctx.world_size} proc x {accum} accum x {micro} seq x "
        f"{cfg.seq_len} = {cfg.total_batch_tokens} tokens; {device} {dtype} ({dtype_reason}), "
        f"compile={use_compile} ({compile_reason}), {fpt / 1e6:.1f} MFLOP/token, peak {peak / 1e9:.0f} GFLOP/s"
    )

    # ---- resume: model, optimizer, data position and RNG from the newest checkpoint ----------------
    sampler = lm_data.WindowSampler(data["train"], cfg.seq_len, cfg.seed)
    ckpt_dir, start = ctx.out_dir / "checkpoints", 0
    latest = checkpoints.latest_checkpoint(ckpt_dir) if cfg.resume == "auto" else None
    latest = distributed.broadcast_object(latest)  # rank 0 decides, every rank resumes from the same step
    if latest is not None:
        ck = checkpoints.load_checkpoint(latest)
        checkpoints.load_full_state(raw, optimizer, ck["model"], ck["optimizer"])
        sampler.load_state_dict(ck["sampler"])
        checkpoints.set_rng_state(ck["rng"])
        start = ck["step"]
        ctx.info(f"resumed from {latest.name} at step {start} (epoch {sampler.epochs_done:.2f})")

    def checkpoint(step: int) -> None:
        model_sd, optim_sd = checkpoints.full_state(raw, optimizer)  # a collective under FSDP: every rank calls it
        if ctx.is_main:
            state = {"model": model_sd, "optimizer": optim_sd, "step": step, "sampler": sampler.state_dict()}
            checkpoints.save_checkpoint({**state, "rng": checkpoints.rng_state()}, ckpt_dir, step, cfg.keep_checkpoints)

    vx, vy = lm_data.eval_windows(data["val"], cfg.seq_len, cfg.eval_windows)

    @torch.no_grad()
    def evaluate() -> float:
        """Mean validation loss per token; ranks split the windows and sum (loss, tokens) at the end. Every
        rank runs the same number of forwards: under FSDP each one all-gathers, so a rank that stopped early
        would leave the others waiting forever (a spare rank scores window 0 and drops it)."""
        raw.eval()  # the uncompiled model: an eval graph would cost a second compilation for a few batches
        total = torch.zeros(2, device=device)
        stride = micro * ctx.world_size
        for i in range(ctx.rank * micro, math.ceil(len(vx) / stride) * stride, stride):
            spare = i >= len(vx)
            x, y = (vx[:1], vy[:1]) if spare else (vx[i : i + micro], vy[i : i + micro])
            with precision.autocast(device, dtype):
                logits = raw(input_ids=x.to(device)).logits
            if not spare:
                total[0] += F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum")
                total[1] += y.numel()
        raw.train()
        loss_sum, count = distributed.all_reduce_sum(total).tolist()
        return loss_sum / count

    # ---- the loop ------------------------------------------------------------------------------------
    ctx.progress(cfg.max_steps, "pretraining")
    hist: dict[str, list] = {"loss": [], "val": [], "tps": [], "mfu": []}
    if start == 0:
        hist["val"].append((0, evaluate()))
        ctx.log(step=0, val_loss=hist["val"][-1][1])
    t_train = time.time()
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        lr = optim.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.lr * cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = sampler.take(seqs_per_rank * ctx.world_size)  # the global step's windows, the same on every rank
        loss_sum = torch.zeros((), device=device)
        for m in range(accum):
            x, y = sampler.windows(lm_data.rank_slice(idx, m, ctx.rank, ctx.world_size, micro))
            with distributed.sync_gradients(model, last=m == accum - 1):  # one all-reduce per step, not per micro
                with precision.autocast(device, dtype):
                    logits = model(input_ids=x.to(device)).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten()) / accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_val = distributed.all_reduce_mean(loss_sum).item()  # .item() also waits for the device to finish
        tps = cfg.total_batch_tokens / (time.perf_counter() - t0)
        mfu = fpt * tps / (peak * ctx.world_size)
        hist["loss"].append((step + 1, loss_val))
        hist["tps"].append(tps)
        hist["mfu"].append(mfu)
        ctx.log(
            step=step + 1,
            loss=loss_val,
            lr=lr,
            grad_norm=float(grad_norm),
            tokens_per_s=round(tps, 1),
            mfu=round(mfu, 4),
        )
        last = step + 1 == cfg.max_steps
        if (step + 1) % cfg.eval_interval == 0 or last:
            hist["val"].append((step + 1, evaluate()))
            ctx.log(step=step + 1, val_loss=hist["val"][-1][1])
        if (step + 1) % cfg.checkpoint_interval == 0 or last:
            checkpoint(step + 1)
    train_s = time.time() - t_train

    # ---- save: weights (safetensors) + tokenizer + generation config, one hf-model dir --------------
    out = ctx.out_dir / "model"
    model_sd, _ = checkpoints.full_state(raw, optimizer)
    if ctx.is_main:
        raw.config.use_cache = True  # off while training (no KV cache needed); users generate with it
        raw.save_pretrained(out, state_dict=model_sd)
        tok.save_pretrained(out)
        GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            do_sample=False,
            max_new_tokens=64,
        ).save_pretrained(out)
    distributed.barrier()
    if not ctx.is_main:  # every rank returns the same outputs; rank 0 alone samples and reports
        return {"model": out}

    # ---- samples (from the saved model, as a user loads it), summary, report ----------------------------
    samples = greedy_samples(out, cfg.sample_prompts, val_texts, cfg.sample_tokens)
    steady = hist["tps"][len(hist["tps"]) // 4 :] or [0.0]  # skip the first steps: warm-up, compile
    ctx.summary.update(
        params=n_params,
        initial_val_loss=round(hist["val"][0][1], 4) if start == 0 else None,
        final_val_loss=round(hist["val"][-1][1], 4) if hist["val"] else None,
        final_train_loss=hist["loss"][-1][1] if hist["loss"] else None,
        tokens_per_s=round(statistics.median(steady), 1),
        mfu=round(fpt * statistics.median(steady) / (peak * ctx.world_size), 4),
        peak_flops=peak,
        compile=use_compile,
        compile_reason=compile_reason,
        world_size=ctx.world_size,
        grad_accum=accum,
        micro_batch=micro,
        flops_per_token=fpt,
        tokens_seen=cfg.max_steps * cfg.total_batch_tokens,
        epochs=round(sampler.epochs_done, 3),
        train_seconds=round(train_s, 2),
        resumed_from_step=start,
        rank0=metrics.rank_bytes(raw, optimizer),  # what rank 0 holds: DDP a full replica, FSDP its shards
    )
    ctx.report(report(cfg, ctx.summary, hist, samples, out, ctx.out_dir))
    return {"model": out}


def greedy_samples(
    model_dir: Path, prompts: list[str] | None, val_texts: list[str], n_tokens: int
) -> list[tuple[str, str]]:
    """Greedy continuations from the saved model, reloaded with AutoModelForCausalLM as a user would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out = []
    for prompt in prompts or [" ".join(t.split()[:6]) for t in val_texts[:4]]:  # openings of held-out docs
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=n_tokens, do_sample=False)
        out.append((prompt, tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)))
    return out


def report(cfg: Config, s: dict, hist: dict, samples: list[tuple[str, str]], out: Path, run_dir: Path) -> str:
    """report.md: derived settings, losses, throughput, the loss plot and the samples."""
    rows = [
        (
            "parameters",
            f"{s['params'] / 1e6:.2f}M ({cfg.n_layer} layers x {cfg.d_model}, {cfg.n_head} heads, seq {cfg.seq_len})",
        ),
        (
            "global batch",
            f"{cfg.total_batch_tokens} tokens = {s['world_size']} proc x {s['grad_accum']} accum x "
            f"{s['micro_batch']} seq",
        ),
        ("tokens seen (epochs)", f"{s['tokens_seen']} ({s['epochs']})"),
        ("val loss start -> end", f"{s['initial_val_loss']} -> {s['final_val_loss']}"),
        ("tokens/s, MFU (median)", f"{s['tokens_per_s']:.0f}, {s['mfu']:.1%} of {s['peak_flops'] / 1e9:.0f} GFLOP/s"),
        ("dtype / compile", f"{s['dtype']} / {s['compile']}"),
        ("train seconds", f"{s['train_seconds']}"),
    ]
    lines = ["# Pretraining run", "", "| measure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if metrics.plot_losses({"train": hist["loss"], "validation": hist["val"]}, run_dir / "loss.png"):
        lines += ["![loss curve](loss.png)", ""]
    lines += [
        "## Greedy samples",
        "",
        *[f"- `{p}` -> `{c.strip()}`" for p, c in samples],
        "",
        "Load it:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})",
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})",
        "```",
        "",
    ]
    return "\n".join(lines)
