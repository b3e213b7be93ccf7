"""Pruning: unstructured magnitude pruning (torch.nn.utils.prune, global L1 over the blocks' weight matrices) at
several sparsities, and structured pruning that really shrinks the model (attention heads: whole KV groups;
MLP width: intermediate channels), each healed by a short fine-tune; the sparsity -> perplexity curve before
and after healing, and what structured pruning buys.

Story: check the inputs (the family's head and MLP layouts and the possible head shares from config.json,
before any weights load) -> tokenize the corpus -> the dense model's held-out perplexity, size and decode
speed -> one loop over every (kind, share): unstructured = prune (masks attached), perplexity, heal with the
masks in place, prune.remove, perplexity, save; heads / mlp = a smaller model keeping the most important KV
groups / channels, perplexity, heal, perplexity, save, parameter count, safetensors size and tokens/s ->
pruning.json, pruning.png, report.md and the summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from skillbook.errors import ConfigError
from skillbook.ml.data_files import CorpusPath
from skillbook.run.recipe import RecipeConfig
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "hf-model", "report": "report"}
INPUTS = {"model": "hf-model", "corpus": "corpus"}


class Config(RecipeConfig):
    model: str = Field(
        ...,
        description="A causal LM to prune: an hf-model dir (save_pretrained, tokenizer inside; e.g. the "
        "pretraining or sft skill's 'model' output) or a hub id when online.",
    )
    corpus: CorpusPath | None = Field(
        None,
        description="Healing and held-out text: a corpus folder (train.jsonl + val.jsonl) or one "
        ".jsonl/.json/.parquet/.txt file (split by val_fraction); None = the embedded synthetic world.",
    )
    val_fraction: float = Field(0.05, gt=0, le=0.5, description="Share of a single corpus file held out.")
    sparsities: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75],
        description="Unstructured: share of the blocks' weights zeroed (global magnitude). 0.0 = the dense "
        "model healed the same way: the control that separates recovery from extra training.",
    )
    mlp_sparsities: list[float] = Field(
        [0.25, 0.5],
        description="Structured: share of MLP intermediate channels removed in every layer (the model shrinks); "
        "[] = unstructured only. Needs a known MLP layout (llama/mistral/qwen2/qwen3/gemma/gemma2, phi3, gpt2).",
    )
    head_sparsities: list[float] | None = Field(
        None,
        description="Structured: share of KV groups (one key/value head with its query heads) removed in every "
        "layer (the model shrinks); must be a whole number of groups and leave >= 1; [] = none; None = [0.5] "
        "where the family allows it (llama/mistral/qwen2/qwen3/gemma2, phi3 with >= 2 KV groups), else none. "
        "gpt2 is refused.",
    )
    heal_steps: int = Field(30, ge=0, description="Healing fine-tune steps after each pruning (0 = no healing).")
    heal_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the healing fine-tune.")
    batch_size: int = Field(8, ge=1, description="Windows per healing step.")
    seq_len: int = Field(128, ge=8, description="Tokens per healing window and per perplexity window.")
    eval_docs: int = Field(48, ge=1, description="Held-out documents the perplexity is computed on.")
    decode_tokens: int = Field(64, ge=2, description="Greedy tokens per decode-speed measurement.")
    save_all: bool = Field(
        True, description="Save every pruned model under models/ (false: only the `model` output; saves disk)."
    )
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default).")
    weights: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weight dtype: auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto = cuda when available.")
    seed: int = Field(0, description="Seed of the healing windows and of a single file's split.")

    @field_validator("sparsities", "mlp_sparsities", "head_sparsities")
    @classmethod
    def _fractions(cls, value: list[float] | None) -> list[float] | None:
        bad = [s for s in value or [] if not 0 <= s < 1]
        if bad:
            raise ValueError(f"every value must be in [0, 1) (a share pruned), got {bad}")
        return sorted(dict.fromkeys(value))

    @model_validator(mode="after")
    def _something_to_prune(self) -> Config:
        if not self.sparsities and not self.mlp_sparsities and self.head_sparsities == []:
            raise ValueError(
                "sparsities, mlp_sparsities and head_sparsities are all empty; give at least one share to prune"
            )
        return self


def measure(model: Any, tok: Any, texts: list[str], cfg: Config) -> float:
    from skillbook.ml.evaluate import perplexity

    return perplexity(model, tok, texts, max_length=cfg.seq_len, batch_size=cfg.batch_size)


def inputs(cfg: Config, ctx: RunContext) -> tuple[str, list[float], Any, list[str]]:
    """The model reference (its family's MLP and head layouts and the head shares checked from config.json),
    the head shares to run, and the corpus' train and held-out texts; every problem is a ConfigError before
    any weights load."""
    from transformers import AutoConfig

    from skillbook.ml import head_pruning as hp
    from skillbook.ml import pruning as pr
    from skillbook.ml.data_files import corpus_sources
    from skillbook.ml.hf_models import resolve_model

    model_ref = resolve_model(cfg.model)
    config = AutoConfig.from_pretrained(model_ref)
    if cfg.mlp_sparsities:
        pr.mlp_layout(config)  # an unknown family fails here, with the fix
    heads = cfg.head_sparsities
    if heads is None:  # the default: half the KV groups where this family and shape allow it
        try:
            hp.check(config, heads := [0.5])
        except ConfigError as err:
            heads = []
            ctx.info(f"no head pruning on this model ({str(err).split(': ', 1)[1]})")
    hp.check(config, heads)  # unknown family, gpt2, or a share that is not whole groups
    if not (cfg.sparsities or cfg.mlp_sparsities or heads):
        raise ConfigError("sparsities, mlp_sparsities: both empty and this model cannot be head-pruned; give a share")
    if cfg.corpus is None:
        from skillbook.ml.finetune_data import default_data

        corpus: str | Path = default_data(ctx, "corpus")
        ctx.info("no corpus given: healing and perplexity use the embedded synthetic world (set corpus=...)")
    else:
        corpus = cfg.corpus
    train_texts, val_texts, note = corpus_sources(corpus, "corpus", cfg.val_fraction, cfg.seed)
    ctx.info(note)
    return model_ref, heads, train_texts, val_texts


def prune_and_heal(
    cfg: Config, kind: str, amount: float, model: Any, tok: Any, texts: list[str], train: Any
) -> tuple[Any, dict[str, Any]]:
    """One row: prune (masks attached, or a smaller model), perplexity, heal, perplexity; the pruned model."""
    from skillbook.ml import head_pruning as hp
    from skillbook.ml import pruning as pr
    from skillbook.ml.hf_models import count_params
    from skillbook.ml.lm_data import WindowSampler

    if kind == "unstructured":
        pr.magnitude_prune(model, amount)
    else:  # structured: a new, smaller model
        model = {"heads": hp.prune_heads, "mlp": pr.shrink_mlp}[kind](model, amount)
    ppl_pruned = measure(model, tok, texts, cfg)
    sampler = WindowSampler(train, cfg.seq_len, cfg.seed)  # every run heals on the same windows
    losses = pr.heal(model, sampler, cfg.heal_steps, cfg.batch_size, cfg.heal_lr, cfg.seed)
    if kind == "unstructured":
        pr.make_permanent(model)  # mask folded into the weight: zeros stay, the model is plain again
    row: dict[str, Any] = {
        "name": f"{kind}-{amount:.2f}",
        "kind": kind,
        "amount": amount,
        "perplexity_pruned": ppl_pruned,
        "perplexity_healed": measure(model, tok, texts, cfg),
        "heal_loss_first": losses[0] if losses else None,
        "heal_loss_last": losses[-1] if losses else None,
        "zero_share": pr.sparsity(model),
        "params": count_params(model)[1],
    }
    return model, {**row, **shape(kind, model.config)}


def shape(kind: str, config: Any) -> dict[str, int]:
    """The config numbers a structured row changes (the dense row carries those of every kind run)."""
    from skillbook.ml import head_pruning as hp
    from skillbook.ml import pruning as pr

    if kind == "mlp":
        return {"intermediate_size": pr.intermediate_size(config)}
    if kind == "heads":
        heads, kv, _ = hp.attention_shape(config)
        return {"num_attention_heads": heads, "num_key_value_heads": kv}
    return {}


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    t_start = time.time()
    # ---- inputs: the model ref, the family's layouts and the corpus, before any weights load ----------
    model_ref, head_shares, train_texts, val_texts = inputs(cfg, ctx)
    device = ctx.setup_device(cfg.device)
    out_json = ctx.out_dir / "pruning.json"
    if not ctx.is_main:  # one process's job
        return {"model": ctx.out_dir / "models", "report": out_json}

    import torch

    from skillbook.ml import pruning as pr
    from skillbook.ml.hf_models import count_params, load_causal_lm, load_tokenizer
    from skillbook.ml.lm_data import load_tokens

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok = load_tokenizer(model_ref)
    tokens = load_tokens({"train": train_texts, "val": val_texts}, tok, cfg.seq_len)
    texts = val_texts[: cfg.eval_docs]
    prompt = tokens["val"][:16].tolist()  # the decode-speed prompt: the first held-out tokens

    def load() -> Any:
        return load_causal_lm(model_ref, weights=cfg.weights).to(device).eval()

    # ---- the dense model: the reference every row compares to -------------------------------------
    dense = load()
    base: dict[str, Any] = {
        "perplexity": measure(dense, tok, texts, cfg),
        "params": count_params(dense)[1],
        "file_bytes": pr.safetensors_bytes(model_ref),
        "tokens_per_s": pr.tokens_per_second(dense, prompt, cfg.decode_tokens),
    }
    for kind, shares in (("heads", head_shares), ("mlp", cfg.mlp_sparsities)):
        base.update(shape(kind, dense.config) if shares else {})
    n_prunable = sum(m.weight.numel() for _, m in pr.prunable(dense))
    ctx.info(
        f"{model_ref}: {base['params'] / 1e6:.2f} M parameters ({n_prunable / 1e6:.2f} M prunable) on {device}; "
        f"perplexity {base['perplexity']:.3f} on {len(texts)} held-out docs, {base['tokens_per_s']:.0f} tokens/s"
    )
    del dense
    ctx.progress(len(cfg.sparsities) + len(head_shares) + len(cfg.mlp_sparsities), "pruning")

    # ---- each pruning: prune -> perplexity -> heal -> perplexity -> save ----------------------------
    rows: list[dict[str, Any]] = []
    # Each row starts from the dense model. The output: the most pruned MLP model, else heads, else unstructured.
    kinds = (("unstructured", cfg.sparsities), ("heads", head_shares), ("mlp", cfg.mlp_sparsities))
    runs = [(kind, s) for kind, shares in kinds for s in shares]
    output_name = f"{runs[-1][0]}-{runs[-1][1]:.2f}"
    for step, (kind, amount) in enumerate(runs, 1):
        t0 = time.time()
        model, row = prune_and_heal(cfg, kind, amount, load(), tok, texts, tokens["train"])
        name, ppl_pruned = row["name"], row["perplexity_pruned"]
        if kind != "unstructured":  # only structured pruning changes the work per token
            row["tokens_per_s"] = pr.tokens_per_second(model, prompt, cfg.decode_tokens)
        if cfg.save_all or name == output_name:
            where = ctx.out_dir / "models" / name
            model.save_pretrained(where)
            tok.save_pretrained(where)
            row["file_bytes"], row["path"] = pr.safetensors_bytes(where), str(where)
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
        ctx.log(step=step, **{k: v for k, v in row.items() if k != "path"})
        ctx.info(
            f"{name:<18} perplexity {base['perplexity']:.3f} -> pruned {ppl_pruned:.3f} -> healed "
            f"{row['perplexity_healed']:.3f}  zeros {row['zero_share']:.3f}  params {row['params'] / 1e6:.3f} M"
            + (f"  {row['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in row else "")
            + f"  ({row['seconds']:.1f} s)"
        )
        del model

    # ---- outputs: the curve (PNG), pruning.json, report.md and the summary carry the same numbers ---
    model_out = ctx.out_dir / "models" / output_name
    plot(base, rows, ctx.out_dir / "pruning.png")
    summarize(ctx, base, rows, output_name, t_start)
    report = {"model": cfg.model, "n_docs": len(texts), "heal_steps": cfg.heal_steps, "dense": base, "rows": rows}
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    ctx.report(render_report(report))
    return {"model": model_out, "report": out_json}


def summarize(ctx: RunContext, base: dict, rows: list[dict], output_name: str, t_start: float) -> None:
    """Every row's numbers as flat summary keys (`<name>_<metric>`), plus the dense reference."""
    for row in rows:
        for key in ("perplexity_pruned", "perplexity_healed", "zero_share", "params", "tokens_per_s", "file_bytes"):
            if row.get(key) is not None:
                ctx.summary[f"{row['name']}_{key}"] = row[key]
    ctx.summary.update(
        dense_perplexity=base["perplexity"],
        dense_params=base["params"],
        dense_tokens_per_s=base["tokens_per_s"],
        dense_file_bytes=base["file_bytes"],
        output_model=output_name,
        seconds=round(time.time() - t_start, 2),
    )


def plot(base: dict, rows: list[dict], path: Path) -> None:
    """Sparsity -> held-out perplexity, before and after healing, one line per pruning kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {
        "unstructured": "unstructured (weights zeroed)",
        "heads": "structured heads (KV groups removed)",
        "mlp": "structured MLP (channels removed)",
    }
    for kind, color in (("unstructured", "tab:blue"), ("heads", "tab:green"), ("mlp", "tab:orange")):
        got = [r for r in rows if r["kind"] == kind]
        if got:
            xs = [r["amount"] for r in got]
            ax.plot(xs, [r["perplexity_pruned"] for r in got], "--o", color=color, label=f"{labels[kind]}, pruned")
            ax.plot(xs, [r["perplexity_healed"] for r in got], "-o", color=color, label=f"{labels[kind]}, healed")
    ax.axhline(base["perplexity"], color="grey", lw=1, label="dense")
    ax.set(xlabel="sparsity (share pruned)", ylabel="held-out perplexity", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_report(r: dict) -> str:
    """report.md: the dense reference, then one row per pruning (structured rows say what shrank)."""
    d = r["dense"]

    def size(b: int | None) -> str:
        return f"{b / 1e6:.2f}" if b is not None else "-"

    def shape(row: dict) -> str:
        if "intermediate_size" in row:
            return f"MLP {d['intermediate_size']} -> {row['intermediate_size']}"
        if "num_key_value_heads" in row:
            return (
                f"heads {d['num_attention_heads']}/{d['num_key_value_heads']} -> "
                f"{row['num_attention_heads']}/{row['num_key_value_heads']} (q/kv)"
            )
        return "-"

    lines = [
        f"# Pruning `{r['model']}`",
        "",
        f"Held-out perplexity on {r['n_docs']} documents; each pruned model healed for {r['heal_steps']} steps. "
        "Unstructured: share of the blocks' weights set to zero (global magnitude); heads: share of KV groups "
        "(a key/value head with its query heads) removed; mlp: share of MLP channels removed. Unstructured files "
        "stay the size of the dense model: zeros are stored densely.",
        "",
        "![sparsity vs perplexity](pruning.png)",
        "",
        "| model | sparsity | shape | perplexity pruned | perplexity healed | zeros | params (M) | file (MB) "
        "| tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | 0 | - | {d['perplexity']:.3f} | - | - | {d['params'] / 1e6:.3f} | {size(d['file_bytes'])} | "
        f"{d['tokens_per_s']:.0f} |",
    ]
    for row in r["rows"]:
        tps = f"{row['tokens_per_s']:.0f}" if row.get("tokens_per_s") else "-"
        lines.append(
            f"| {row['name']} | {row['amount']:.2f} | {shape(row)} | {row['perplexity_pruned']:.3f} "
            f"| {row['perplexity_healed']:.3f} | {row['zero_share']:.3f} | {row['params'] / 1e6:.3f} "
            f"| {size(row.get('file_bytes'))} | {tps} |"
        )
    return "\n".join(lines) + "\n"
