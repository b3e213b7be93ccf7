"""Mixture of experts: train a small sparse Mixtral-class decoder (from scratch or upcycled from a dense Llama)
next to a dense baseline with the same active parameters, on the same batches, and watch the routing.

Story: corpus + tokenizer -> MoE model (fresh Mixtral, or every expert copied from a dense Llama's MLP)
and its dense twin -> one loop trains both on each batch; forward hooks on every router count the
top-k choices per layer and expert -> metrics.jsonl per step (loss, normalised aux loss, router entropy,
expert loads, utilization) -> heat map of load over training, loss curves -> save, reload with
AutoModelForCausalLM, generate -> report.md compares MoE and dense loss at equal steps.
Why Mixtral: its experts are Llama's SwiGLU MLP (gate/up/down), so upcycling a Llama is exact, and
vLLM, SGLang, llama.cpp and Megatron all serve or train the class. Qwen2-MoE adds a shared expert
with a sigmoid gate and OLMoE a QK-norm, so neither maps 1:1 onto a Llama.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from skillbook.ml import lm_data
from skillbook.ml.data_files import CorpusPath, corpus_sources
from skillbook.ml.moe import report, routing, upcycling
from skillbook.ml.tokenizer_utils import load_tokenizer
from skillbook.ml.training import distributed, metrics, optim, precision
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "hf-model"}
INPUTS = {"corpus": "corpus", "tokenizer": "tokenizer", "dense_model": "hf-model"}


class Config(RecipeConfig):
    """The defaults are the CPU-tiny run: a 2-layer, 4-expert top-2 Mixtral and its dense twin (intermediate
    2 x 256) trained on the same 200 batches of the embedded synthetic world; about a minute on 2 cores."""

    # --- inputs -------------------------------------------------------------------------------
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
        description="HF tokenizer directory; None = the dense model's own tokenizer when upcycling, else one the "
        "tokenization skill trains on the corpus (into run_dir/tokenization/).",
    )
    dense_model: str | None = Field(
        None, description="Dense Llama hf-model to upcycle (init=upcycle), e.g. the pretraining run's 'model' output."
    )
    init: Literal["scratch", "upcycle"] = Field(
        "scratch",
        description="scratch: a fresh Mixtral of the shape below; upcycle: copy dense_model and turn each MLP into "
        "num_experts identical experts.",
    )
    vocab_size: int = Field(1024, ge=300, description="Vocabulary of the tokenizer trained when none is given.")
    # --- model shape (scratch only; upcycling takes the dense model's shape) ------------------
    hidden_size: int = Field(128, ge=16, description="Model width d.")
    num_layers: int = Field(2, ge=1, description="Decoder layers; every one is a MoE layer.")
    num_heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    expert_intermediate_size: int = Field(256, ge=8, description="Hidden width of each expert's SwiGLU MLP.")
    # --- routing ------------------------------------------------------------------------------
    num_experts: int = Field(4, ge=2, description="Experts per MoE layer (Mixtral 8, OLMoE 64, DeepSeek-V3 256).")
    top_k: int = Field(2, ge=1, description="Experts each token is sent to; the rest are skipped (Mixtral 2, OLMoE 8).")
    aux_loss_coef: float = Field(
        0.01,
        ge=0.0,
        description="Weight of the Switch load-balancing loss (transformers' aux_loss, which is top_k at perfect "
        "balance). 0.01 = Switch/OLMoE; Mixtral's config default is 0.001; 0 = no balancing.",
    )
    z_loss_coef: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the ST-MoE router z-loss (mean logsumexp(logits)^2); 0.001 is typical for large runs, "
        "where router logits blow up in bf16.",
    )
    router_jitter: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Multiplicative uniform noise on router inputs during training (Mixtral's router_jitter_noise); "
        "0.01 was used by Switch.",
    )
    capacity_factor: float = Field(
        1.25,
        gt=0.0,
        description="For reporting only: share of assignments a capacity-limited router (Switch, DeepSpeed-MoE) "
        "would drop at this factor. Mixtral in transformers is dropless.",
    )
    router_lr_scale: float = Field(
        1.0,
        gt=0.0,
        description="Router learning rate = lr x this (routers get no weight decay). Below 1 steadies routing when "
        "small routers flip between experts every step.",
    )
    router_init_expert: int | None = Field(
        None,
        ge=0,
        description="Initialise every router to favour this expert for all tokens (demonstrates collapse; pair with "
        "aux_loss_coef=0). None = normal init.",
    )
    router_init_scale: float = Field(
        10.0, gt=0.0, description="Strength of router_init_expert's preference (router weight on the shared channel)."
    )
    # --- baseline and optimisation ------------------------------------------------------------
    baseline: bool = Field(
        True,
        description="Train a dense Llama twin on the same batches: from scratch with intermediate size top_k x "
        "expert size (equal active MLP parameters); when upcycling, the dense model itself, continued.",
    )
    steps: int = Field(
        200,
        ge=1,
        description="Optimizer steps (each trains the MoE and, if baseline, the dense twin on the same batch).",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per step (per rank under torchrun).")
    seq_len: int = Field(64, ge=8, description="Tokens per sequence.")
    lr: float = Field(
        3e-3,
        gt=0.0,
        description="Peak learning rate (linear warmup, cosine decay to lr/10). Upcycling real models: about the "
        "dense run's final lr.",
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay on matrices.")
    grad_clip: float = Field(1.0, gt=0.0, description="Clip the global gradient norm to this.")
    eval_interval: int = Field(
        50, ge=1, description="Validation loss of both models every this many steps (and at step 0)."
    )
    eval_windows: int = Field(16, ge=1, description="Validation windows of seq_len tokens per evaluation.")
    device: str = Field("auto", description="auto (cuda if present, else cpu), cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Autocast dtype; auto = bf16 on bf16 GPUs and on native-bf16 CPUs for models of 5M+ params, else "
        "fp32; SKILLBOOK_AUTO_DTYPE overrides auto.",
    )
    seed: int = Field(0, description="Seed for data order, initialisation and the default data.")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        """Refuse impossible combinations before anything runs."""
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} is larger than num_experts={self.num_experts}: a token cannot "
                f"visit more experts than exist; lower top_k or raise num_experts"
            )
        if self.init == "upcycle" and not self.dense_model:
            raise ValueError("init=upcycle needs dense_model: the dense Llama hf-model whose MLPs become the experts")
        if self.init == "scratch" and self.dense_model:
            raise ValueError("dense_model is only used with init=upcycle; set init=upcycle or drop dense_model")
        if self.router_init_expert is not None and self.router_init_expert >= self.num_experts:
            raise ValueError(
                f"router_init_expert={self.router_init_expert} must be below num_experts={self.num_experts}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        return self


# ---------------------------------------------------------------------------------------------
# Data and tokenizer
# ---------------------------------------------------------------------------------------------


def corpus_and_tokenizer(cfg: Config, ctx: RunContext, dense_dir: Path | None):
    """The corpus (a folder or one file) and a tokenizer: given, the dense model's own, or one the tokenization
    skill trains on the same train split."""
    if cfg.corpus is None:
        from skillbook.ml.synthetic import write_default_data

        if ctx.is_main:  # one writer; the other ranks wait, then read the same files
            write_default_data(ctx.out_dir / "data", cfg.seed)
        distributed.barrier()
        corpus = ctx.out_dir / "data" / "corpus"
    else:
        corpus = artifact_path(cfg.corpus, "corpus")
    if cfg.tokenizer or dense_dir:
        return corpus, load_tokenizer(artifact_path(cfg.tokenizer, "tokenizer") if cfg.tokenizer else dense_dir)
    # The tokenization skill itself (its byte-level BPE and specials) on this corpus, into run_dir/tokenization/
    sets = {"corpus": str(corpus), "vocab_size": cfg.vocab_size, "seed": cfg.seed, "val_fraction": cfg.val_fraction}
    tok = ctx.run_skill("tokenization", sets)
    return corpus, load_tokenizer(tok["outputs"]["tokenizer"]["path"])


# ---------------------------------------------------------------------------------------------
# Models: the MoE and its dense twin with the same active parameters
# ---------------------------------------------------------------------------------------------


def build_models(cfg: Config, tok, dense_dir: Path | None):
    """(moe, dense or None): a fresh Mixtral + Llama pair, or an upcycled Llama + the Llama itself."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    router = dict(router_aux_loss_coef=cfg.aux_loss_coef, router_jitter_noise=cfg.router_jitter)
    if cfg.init == "upcycle":
        dense = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32)
        moe = upcycling.upcycle(dense, cfg.num_experts, cfg.top_k, seed=cfg.seed, **router)
        return moe, (copy.deepcopy(dense) if cfg.baseline else None)
    vocab = -(-len(tok) // 64) * 64  # round up to a multiple of 64: tensor-core friendly, spare rows unused
    shape = dict(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.seq_len * 4,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    moe = MixtralForCausalLM(
        MixtralConfig(
            **shape,
            intermediate_size=cfg.expert_intermediate_size,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k,
            sliding_window=None,
            **router,
        )
    )
    # Equal active compute: the dense MLP is as wide as the top_k experts a token visits, combined.
    dense = (
        LlamaForCausalLM(LlamaConfig(**shape, intermediate_size=cfg.top_k * cfg.expert_intermediate_size))
        if cfg.baseline
        else None
    )
    return moe, dense


# ---------------------------------------------------------------------------------------------
# Losses and evaluation
# ---------------------------------------------------------------------------------------------


def losses(model, x, y, cfg: Config, is_moe: bool):
    """(total to backprop, cross-entropy, aux loss / top_k (1.0 = balanced), z-loss)."""
    import torch.nn.functional as F

    out = model(input_ids=x, output_router_logits=True) if is_moe else model(input_ids=x)
    ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
    if not is_moe:
        return ce, ce, None, None
    # Per-layer Switch loss, not transformers' out.aux_loss, which pools layers (see references/load-balancing.md).
    aux = routing.per_layer_aux_loss(out.router_logits, cfg.num_experts, cfg.top_k)
    z = routing.router_z_loss(out.router_logits)
    return ce + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z, ce, aux.detach() / cfg.top_k, z.detach()


def train_step(model, opt, x, y, lr: float, cfg: Config, is_moe: bool, device: str, dtype: str):
    """One optimizer step on (x, y); returns the detached (cross-entropy, aux / top_k, z-loss)."""
    import torch

    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    with precision.autocast(device, dtype):
        total, ce, aux, z = losses(model, x, y, cfg, is_moe)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ce.detach(), aux, z


def evaluate(model, val, device: str, dtype: str) -> float:
    """Mean next-token cross-entropy on the fixed validation windows."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad(), precision.autocast(device, dtype):
        logits = model(input_ids=val[0].to(device)).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[1].to(device).reshape(-1)).item()
    model.train()
    return loss


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    """Build, train MoE and dense twin on the same batches, record routing, save, reload, generate, report."""
    # ---- set-up: refuse a wrong dense model before any data or weights are touched -------------
    dense_dir = upcycling.check_upcycle_source(cfg.dense_model) if cfg.init == "upcycle" else None
    device = ctx.setup_device(cfg.device)  # joins the process group first under torchrun
    precision.seed_everything(cfg.seed)

    corpus, tok = corpus_and_tokenizer(cfg, ctx, dense_dir)
    train_texts, val_texts, note = corpus_sources(corpus, "corpus", cfg.val_fraction, cfg.seed)
    ctx.info(note)
    tokens = lm_data.load_tokens({"train": train_texts, "val": val_texts}, tok, cfg.seq_len)
    sampler = lm_data.WindowSampler(tokens["train"], cfg.seq_len, cfg.seed)
    val = lm_data.eval_windows(tokens["val"], cfg.seq_len, cfg.eval_windows)

    moe, dense = build_models(cfg, tok, dense_dir)
    if cfg.router_init_expert is not None:
        routing.favour_expert(moe, cfg.router_init_expert, cfg.router_init_scale)
    counts = {"moe": routing.param_counts(moe), **({"dense": routing.param_counts(dense)} if dense else {})}
    ctx.info(
        f"{cfg.init} MoE: {cfg.num_experts} experts, top-{cfg.top_k}, {counts['moe']['total']:,} params, "
        f"{counts['moe']['active']:,} active per token"
        + (f"; dense twin {counts['dense']['total']:,}" if dense else "")
    )
    dtype, dtype_reason = ctx.choose_dtype(cfg.dtype, counts["moe"]["total"])
    ctx.info(f"dtype {dtype} ({dtype_reason})")
    models = {"moe": moe.to(device), **({"dense": dense.to(device)} if dense else {})}
    opts = {"moe": routing.adamw_router_scaled(moe, cfg.lr, cfg.weight_decay, (0.9, 0.95), cfg.router_lr_scale)}
    if dense is not None:
        opts["dense"] = optim.adamw(dense, cfg.lr, cfg.weight_decay, (0.9, 0.95))
    wrapped = {k: distributed.wrap_model(m, device) for k, m in models.items()}  # DDP under torchrun

    # ---- step 0: the upcycled model must compute the dense model's function -------------------
    evals = {k: [(0, evaluate(m, val, device, dtype))] for k, m in models.items()}
    if cfg.init == "upcycle" and dense is not None:
        ctx.summary["upcycle_step0_gap"] = abs(evals["moe"][0][1] - evals["dense"][0][1])
        ctx.info(f"step 0 val loss: upcycled MoE {evals['moe'][0][1]:.5f}, dense {evals['dense'][0][1]:.5f}")

    # ---- train: both models see exactly the same batch at every step -----------------------------
    ctx.progress(cfg.steps, "moe")
    history = {"steps": [], "loads": []}
    with routing.RoutingCounter(moe) as counter:
        for step in range(1, cfg.steps + 1):
            idx = sampler.take(cfg.batch_size * ctx.world_size)  # the global batch, the same on every rank
            x, y = sampler.windows(idx[ctx.rank * cfg.batch_size : (ctx.rank + 1) * cfg.batch_size])  # our rows
            x, y = x.to(device), y.to(device)
            lr = optim.lr_at(step - 1, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr / 10)
            record = {"lr": lr}
            counter.reset()  # counts below are this step's only
            for name, model in wrapped.items():
                ce, aux, z = train_step(model, opts[name], x, y, lr, cfg, name == "moe", device, dtype)
                record[f"{name}_loss"] = distributed.all_reduce_mean(ce).item()
                if aux is not None:
                    record.update(aux_loss_normalised=aux.item(), z_loss=z.item())
            # Routing counts of this step (summed over ranks): loads, utilization, entropies.
            distributed.all_reduce_sum(counter.counts)
            stats = routing.routing_stats(counter.counts, counter.router_entropy(), cfg.capacity_factor, cfg.top_k)
            history["steps"].append(step)
            history["loads"].append(stats["loads"])
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                for name, model in models.items():
                    evals[name].append((step, evaluate(model, val, device, dtype)))
                    record[f"{name}_val_loss"] = evals[name][-1][1]
            ctx.log(step=step, loss=record["moe_loss"], **record, **stats)

    # ---- save, reload with the stock loader, generate -----------------------------------------
    out = ctx.out_dir / "model"
    if ctx.is_main:
        moe.config.output_router_logits = False  # inference default: no router logits in every output
        moe.save_pretrained(out)
        tok.save_pretrained(out)
        sample = reload_and_generate(out)
        plots = plot(ctx.out_dir, history, evals, cfg)
        final = routing.final_loads(history["loads"])  # mean load over the last 10% of steps
        utils = [routing.utilization(row) for row in final]
        ctx.summary.update(
            moe_val_loss=evals["moe"][-1][1],
            utilization_min=min(utils),
            max_load_ratio=max(max(r) * len(r) for r in final),
            total_params=counts["moe"]["total"],
            active_params=counts["moe"]["active"],
        )
        if dense is not None:
            ctx.summary["dense_val_loss"] = evals["dense"][-1][1]
        ctx.report(report.render_report(cfg.model_dump(), counts, evals, final, sample, plots, out))
    distributed.barrier()
    return {"model": out}  # the same on every rank; rank 0 alone wrote it


def reload_and_generate(path: Path) -> str:
    """What users do: AutoModelForCausalLM + AutoTokenizer on the saved dir, greedy continuation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok("Mira", return_tensors="pt")
    new = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(new[0], skip_special_tokens=True)


def plot(out_dir: Path, history: dict, evals: dict, cfg: Config) -> dict[str, str]:
    """expert_load.png (heat map per layer over training) and loss.png (MoE vs dense, same steps)."""
    report.plot_load_heatmap(
        history["steps"],
        history["loads"],
        out_dir / "expert_load.png",
        f"Expert load per layer (top-{cfg.top_k} of {cfg.num_experts}, aux coef {cfg.aux_loss_coef:g})",
    )
    metrics.plot_losses({f"{k} (val)": v for k, v in evals.items()}, out_dir / "loss.png")
    return {"heatmap": "expert_load.png", "loss": "loss.png"}
