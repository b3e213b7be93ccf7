"""Transformer from scratch: train the one-file decoder of skillbook.ml.scratch_transformer on the embedded
world, sample from it, plot its attention, and show that (with RoPE) it is exactly a Llama.

Story: check the config (head sizes divide, before any file) -> the corpus (embedded world by default) ->
a tokenizer: characters, or the project's byte-level BPE (given, or trained with the tokenization skill) ->
one flat token stream per split -> the model -> held-out loss at init -> AdamW on random windows (warmup +
cosine), held-out loss every eval_every steps -> samples -> attention maps of a real sentence (attention.png)
-> with rope: the trained weights loaded into transformers' LlamaForCausalLM give the same logits -> the
weights (safetensors), config.json and the tokenizer in model/, report.md, the summary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from skillbook.ml.data_files import CorpusPath
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "dir", "attention": "file", "report": "report"}
INPUTS = {"corpus": "corpus", "tokenizer_dir": "tokenizer"}


class Config(RecipeConfig):
    """CPU-tiny default: a 2 x 64 character-level Llama (0.1M params), 300 steps x 16 x 128 tokens, ~30 s."""

    tokenizer: Literal["char", "bpe"] = Field(
        "char", description="char = one id per character (tiny vocabulary); bpe = the project's byte-level BPE."
    )
    tokenizer_dir: str | None = Field(
        None, description="bpe only: an HF tokenizer dir; None = train one with the tokenization skill (~5 s)."
    )
    corpus: CorpusPath | None = Field(
        None, description="Corpus (folder with train/val, or one file); None = the embedded synthetic world."
    )
    val_fraction: float = Field(0.05, gt=0, le=0.5, description="Held-out share of a single corpus file.")
    positional: Literal["rope", "learned", "sinusoidal"] = Field(
        "rope", description="rope = rotary (Llama); learned = a trained table (GPT-2); sinusoidal = fixed waves."
    )
    rope_theta: float = Field(10000.0, gt=1, description="RoPE base (Llama-3: 500000; larger = longer context).")
    d_model: int = Field(64, ge=8, description="Residual-stream width (a multiple of n_head).")
    n_layer: int = Field(2, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Query heads; head size = d_model / n_head (even, for rope).")
    n_kv_head: int | None = Field(None, ge=1, description="Key/value heads (GQA; divides n_head); None = n_head.")
    tie_embeddings: bool = Field(False, description="Share the token embedding and the LM head matrix.")
    seq_len: int = Field(128, ge=8, description="Tokens per training window (and the model's context).")
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Windows per step.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (3e-3 at 0.1M params; 6e-4 at 100M).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps, then cosine decay to lr / 10.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not norms).")
    eval_every: int = Field(100, ge=1, description="Steps between held-out evaluations.")
    eval_windows: int = Field(32, ge=1, description="Held-out windows of the val loss.")
    samples: int = Field(3, ge=0, description="Lines sampled after training, each from a held-out document's start.")
    sample_tokens: int = Field(120, ge=1, description="New tokens per sample.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (0 = greedy).")
    plot_tokens: int = Field(32, ge=2, description="Tokens of the sentence whose attention maps are plotted.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when a GPU is visible.")
    seed: int = Field(0, description="Seed of the init, the batch order and a single file's split.")

    @model_validator(mode="after")
    def _shapes(self) -> Config:
        kv = self.n_kv_head or self.n_head
        if self.d_model % self.n_head:
            raise ValueError(f"d_model: {self.d_model} is not divisible by n_head={self.n_head}; pick a multiple")
        if self.n_head % kv:
            raise ValueError(f"n_kv_head: {kv} does not divide n_head={self.n_head}; use a divisor of n_head")
        if self.positional == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model: head size {self.d_model // self.n_head} is odd; rope needs an even head size")
        if self.tokenizer_dir and self.tokenizer == "char":
            raise ValueError("tokenizer_dir: only used with tokenizer=bpe; set tokenizer=bpe or drop tokenizer_dir")
        return self


def get_tokenizer(cfg: Config, ctx: RunContext, corpus: Path, train_texts: Any) -> Any:
    """A CharTokenizer over the train split's characters, or an HF byte-level BPE tokenizer."""
    from skillbook.ml.scratch_transformer import CharTokenizer
    from skillbook.ml.tokenizer_utils import load_tokenizer

    if cfg.tokenizer == "char":
        return CharTokenizer("".join(set("".join(train_texts))))
    if cfg.tokenizer_dir:
        return load_tokenizer(cfg.tokenizer_dir, "tokenizer_dir")
    res = ctx.run_skill("tokenization", {"corpus": str(corpus), "seed": cfg.seed, "val_fraction": cfg.val_fraction})
    ctx.info("no tokenizer_dir given: trained a byte-level BPE with the tokenization skill")
    return load_tokenizer(res["outputs"]["tokenizer"]["path"])


def tokenize(tok: Any, texts: Any) -> Any:
    """One flat id tensor: each document followed by an end-of-text id (BOS + text + EOS for BPE)."""
    import torch

    from skillbook.ml import lm_data
    from skillbook.ml.scratch_transformer import CharTokenizer

    if isinstance(tok, CharTokenizer):
        return torch.tensor([i for t in texts for i in (*tok.encode(t), tok.eos_id)], dtype=torch.long)
    return lm_data.tokenize_texts(tok, texts)


def encode(tok: Any, text: str) -> list[int]:
    """Ids of one text without special tokens (the char tokenizer has none to add)."""
    from skillbook.ml.scratch_transformer import CharTokenizer

    return tok.encode(text) if isinstance(tok, CharTokenizer) else tok.encode(text, add_special_tokens=False)


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    import torch.nn.functional as F

    from skillbook.ml import lm_data
    from skillbook.ml import scratch_transformer as st
    from skillbook.ml.data_files import corpus_sources
    from skillbook.ml.training import optim, precision

    # ---- data and tokenizer --------------------------------------------------------------------------------
    if cfg.corpus is None:
        from skillbook.ml.finetune_data import default_data

        corpus = default_data(ctx, "corpus")
    else:
        corpus = artifact_path(cfg.corpus, "corpus")
    train_texts, val_texts, note = corpus_sources(corpus, "corpus", cfg.val_fraction, cfg.seed)
    ctx.info(note)
    tok = get_tokenizer(cfg, ctx, corpus, train_texts)
    data = {"train": tokenize(tok, train_texts), "val": tokenize(tok, val_texts)}
    for split, ids in data.items():
        if len(ids) < cfg.seq_len + 1:
            from skillbook.errors import ConfigError

            raise ConfigError(f"seq_len: the {split} split has only {len(ids)} tokens; lower seq_len or add text")
    vocab = tok.vocab_size if cfg.tokenizer == "char" else len(tok)

    # ---- the model -------------------------------------------------------------------------------------
    device = ctx.setup_device(cfg.device)
    precision.seed_everything(cfg.seed)
    mcfg = st.ScratchConfig(
        vocab_size=vocab, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_kv_head=cfg.n_kv_head or 0, max_seq_len=cfg.seq_len, positional=cfg.positional,
        rope_theta=cfg.rope_theta, tie_embeddings=cfg.tie_embeddings,
    )  # fmt: skip
    model = st.Transformer(mcfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.batch_size * cfg.seq_len
    ctx.info(
        f"{cfg.tokenizer} tokenizer ({vocab} ids), {len(data['train']):,} train / {len(data['val']):,} val tokens; "
        f"{cfg.n_layer} x {cfg.d_model}, {cfg.n_head} heads ({mcfg.n_kv_head} kv), d_ff {mcfg.d_ff}, "
        f"{cfg.positional}: {n_params / 1e6:.3f}M params; {cfg.steps} steps x {tokens_per_step} tokens on {device}"
    )
    vx, vy = lm_data.eval_windows(data["val"], cfg.seq_len, cfg.eval_windows)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        total = 0.0
        for i in range(0, len(vx), cfg.batch_size):
            logits = model(vx[i : i + cfg.batch_size].to(device))
            total += F.cross_entropy(
                logits.flatten(0, 1), vy[i : i + cfg.batch_size].to(device).flatten(), reduction="sum"
            ).item()
        model.train()
        return total / vy.numel()

    # ---- train: random windows, AdamW, warmup + cosine ----------------------------------------------------
    first = val_loss()  # ~ln(vocab) at init: the model knows nothing yet
    ctx.log(step=0, val_loss=first)
    opt = optim.adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.95), fused=False)
    sampler = lm_data.WindowSampler(data["train"], cfg.seq_len, cfg.seed)
    ctx.progress(cfg.steps, "train")
    t0, last = time.time(), first
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = optim.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr / 10)
        x, y = (t.to(device) for t in sampler.windows(sampler.take(cfg.batch_size)))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # predict token t+1 from tokens <= t
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one bad batch cannot blow up the weights
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = {"loss": loss.item(), "lr": opt.param_groups[0]["lr"]}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            last = metrics["val_loss"] = val_loss()
        ctx.log(step=step + 1, **metrics)
    seconds = time.time() - t0
    model.eval()

    # ---- samples, attention maps, the Llama check --------------------------------------------------------
    samples = []
    for text in val_texts[: cfg.samples]:
        prompt = " ".join(text.split()[:3])
        ids = torch.tensor([encode(tok, prompt)], device=device)
        out = model.generate(ids, cfg.sample_tokens, cfg.temperature, top_k=50)
        samples.append(tok.decode(out[0].tolist()))
    sentence = next((t for t in val_texts if len(t.split()) >= 4), val_texts[0])
    attention = plot_attention(model, tok, sentence, cfg, ctx.out_dir / "attention.png", device)
    diff = llama_diff(model, mcfg, vx[:4].to(device)) if cfg.positional == "rope" else None

    # ---- save: weights, config, tokenizer; report ----------------------------------------------------------
    from safetensors.torch import save_model

    model_dir = ctx.out_dir / "model"
    model_dir.mkdir(exist_ok=True)
    save_model(model, str(model_dir / "model.safetensors"))  # handles the tied matrix (stored once)
    (model_dir / "config.json").write_text(json.dumps(asdict(mcfg) | {"tokenizer": cfg.tokenizer}, indent=2) + "\n")
    if cfg.tokenizer == "char":
        (model_dir / "vocab.json").write_text(json.dumps(tok.itos, ensure_ascii=False) + "\n")
    else:
        tok.save_pretrained(model_dir)
    ctx.summary.update(
        params=n_params, vocab_size=vocab, val_loss_first=round(first, 4), val_loss_last=round(last, 4),
        train_seconds=round(seconds, 1), tokens_per_s=round(cfg.steps * tokens_per_step / seconds),
        llama_max_abs_diff=diff, attention_tokens=attention,
    )  # fmt: skip
    report = write_report(cfg, ctx, samples, math.log(vocab))
    return {"model": model_dir, "attention": ctx.out_dir / "attention.png", "report": report}


def plot_attention(model: Any, tok: Any, text: str, cfg: Config, path: Path, device: str) -> int:
    """One heatmap per head of layer 0 and the last layer: row = query token, column = key token it reads."""
    import matplotlib
    import torch

    matplotlib.use("Agg")  # no display: write the PNG only
    import matplotlib.pyplot as plt

    ids = encode(tok, text)[: cfg.plot_tokens]
    with torch.no_grad():
        _, attns = model(torch.tensor([ids], device=device), return_attn=True)
    layers = sorted({0, cfg.n_layer - 1})
    labels = [tok.decode([i]).replace("\n", "\\n") for i in ids]
    fig, axes = plt.subplots(len(layers), cfg.n_head, figsize=(3 * cfg.n_head, 3 * len(layers)), squeeze=False)
    for r, layer in enumerate(layers):
        for h in range(cfg.n_head):
            ax = axes[r][h]
            ax.imshow(attns[layer][0, h].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {h}", fontsize=8)
            ax.set_xticks(range(len(ids)), labels, fontsize=4, rotation=90)
            ax.set_yticks(range(len(ids)), labels, fontsize=4)
    fig.suptitle(
        f"attention of {text[:60]!r} (query rows read key columns; causal: nothing right of the diagonal)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return len(ids)


def llama_diff(model: Any, mcfg: Any, x: Any) -> float:
    """The trained weights loaded into transformers' LlamaForCausalLM: max |logit difference| on held-out windows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from skillbook.ml.scratch_transformer import our_name

    hf_cfg = LlamaConfig(
        vocab_size=mcfg.vocab_size, hidden_size=mcfg.d_model, intermediate_size=mcfg.d_ff,
        num_hidden_layers=mcfg.n_layer, num_attention_heads=mcfg.n_head, num_key_value_heads=mcfg.n_kv_head,
        max_position_embeddings=mcfg.max_seq_len, rms_norm_eps=mcfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": mcfg.rope_theta},
        tie_word_embeddings=mcfg.tie_embeddings,
    )  # fmt: skip
    llama = LlamaForCausalLM(hf_cfg).to(x.device).eval()
    ours = model.state_dict()
    llama.load_state_dict({k: ours[our_name(k)] for k in llama.state_dict()})
    with torch.no_grad():
        return float((llama(input_ids=x).logits - model(x)).abs().max())


def write_report(cfg: Config, ctx: RunContext, samples: list[str], uniform: float) -> Path:
    s = ctx.summary
    diff = s["llama_max_abs_diff"]
    lines = [
        "# transformer-from-scratch",
        "",
        f"A {cfg.n_layer} x {cfg.d_model} decoder ({cfg.positional}, {cfg.tokenizer} tokenizer, {s['vocab_size']} ids, "
        f"{s['params'] / 1e6:.3f}M params), {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| held-out loss at init (uniform = ln V = {uniform:.3f}) | {s['val_loss_first']:.4f} |",
        f"| held-out loss after training | {s['val_loss_last']:.4f} |",
        f"| train seconds / tokens per s | {s['train_seconds']} / {s['tokens_per_s']:,} |",
        f"| max abs logit diff vs LlamaForCausalLM | {'-' if diff is None else f'{diff:.2e}'} |",
        "",
        "![attention maps](attention.png)",
        "",
        "## Samples",
        "",
        *[f"- `{t!r}`" for t in samples],
    ]
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[4:10]))
    return ctx.out_dir / "report.md"
