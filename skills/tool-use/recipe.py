"""Tool use (function calling): SFT a causal LM on tool-call traces, then run it in an executor loop that
parses its JSON call, executes the tool in Python, appends the result and generates the final answer.

Story: the requests (seeded, over the embedded world: arithmetic for a `calculator` tool, facts for a
`lookup(name, fact)` tool; held-out requests apart) -> the model (trained with the pretraining skill
when not given) -> a chat template that renders `tools`, tool calls and tool results (the model's own when
it has one) -> each trace rendered with `tok.apply_chat_template(messages, tools=TOOLS)` into one
pre-tokenized row (loss on the assistant turns only: the call, and the answer after the tool result), plus
the bare answer without tools -> TRL's SFTTrainer (full or LoRA) -> save -> reload the saved model and
measure on the held-out requests: valid-call rate, correct-argument rate, and exact match with tools (the
executor loop) against the same model answering without tools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from skillbook.errors import ConfigError
from skillbook.run.blocks import BlockConfig, Logging, LoRA, Optim, Precision
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "hf-model", "traces": "dir", "report": "report"}
INPUTS = {"model": "hf-model"}


class Config(BlockConfig):
    """The defaults are the CPU-tiny run: the pretraining default (0.98M params, 128-token context) trained
    here, 400 arithmetic + 200 lookup requests (1,200 rows), 1,000 full fine-tuning steps of 16 rows at a
    constant lr: copying operands and results from the context is learned late, in a jump."""

    # --- inputs -------------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Start model: an hf-model dir (with its tokenizer) or hub id; None = train the pretraining "
        "default on the embedded world first.",
    )
    pretrain: dict[str, Any] = Field(
        default_factory=dict, description="pretraining overrides when model is None (e.g. {max_steps: 600})."
    )
    chat_template: Literal["auto", "skillbook", "model"] = Field(
        "auto",
        description="auto: the tokenizer's own template if it renders `tools`, else Skillbook's tool template "
        "(skillbook.ml.tool_calls.TOOL_CHAT_TEMPLATE); skillbook: always ours; model: the tokenizer's own.",
    )
    # --- the traces ---------------------------------------------------------------------------
    arithmetic: int = Field(400, ge=1, description="Training arithmetic requests (distinct a + b / a - b).")
    max_operand: int = Field(
        20,
        ge=1,
        le=10**6,
        description="Operands are 0..max_operand (the world's corpus only has 0..9); the default keeps most "
        "operands one token.",
    )
    lookups: int = Field(200, ge=0, description="Training lookup requests (of the world's 456 non-eval ones).")
    eval_requests: int = Field(
        64, ge=1, description="Held-out requests per kind (arithmetic, lookup; lookup has at most 72)."
    )
    direct_answers: bool = Field(
        True,
        description="Also train each request's bare answer without tools, so the same model answers directly "
        "when no tools are given: the without-tools baseline.",
    )
    # --- method and optimisation --------------------------------------------------------------
    method: Literal["full", "lora"] = Field("full", description="full: every weight (fine at 1M params); lora.")
    lora: LoRA = Field(LoRA(), description="The adapter for method lora (merged into the saved model).")
    steps: int = Field(
        1000, ge=1, description="Optimizer steps; at 1M params the copying of operands starts after ~600 x 16 rows."
    )
    batch_size: int = Field(16, ge=1, description="Rows per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optim: Optim = Field(
        Optim(lr=3e-3, schedule="constant_with_warmup", warmup_ratio=0.05),
        description="AdamW + schedule. lr: 3e-3 held constant for full fine-tuning at 1M params (a decaying lr "
        "stops before the copying starts); 1e-5..2e-5 full / 1e-4..2e-4 LoRA on 1-8B models.",
    )
    max_length: int = Field(128, ge=16, description="Token budget per row; a longer rendered row is refused.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (GPU memory).")
    seed: int = Field(0, description="Seed: the requests, their split, data order and init.")
    precision: Precision = Field(Precision(), description="Weight dtype and mixed-precision autocast.")
    logging: Logging = Field(Logging(), description="Metric cadence and external trackers.")
    # --- evaluation ---------------------------------------------------------------------------
    call_tokens: int = Field(64, ge=8, description="Greedy tokens for the call turn.")
    answer_tokens: int = Field(8, ge=1, description="Greedy tokens for the final answer.")


def pick_template(cfg: Config, tok: Any, model_ref: str) -> str:
    """Which chat template renders the traces. Ours comes with the four tool-marker tokens (added when the
    tokenizer lacks them) and a response_template, so tok.parse_response and `transformers serve` parse calls."""
    from skillbook.ml import tool_calls as tc

    own = tok.chat_template if isinstance(tok.chat_template, str) else None
    if cfg.chat_template == "model" or (cfg.chat_template == "auto" and own and "tools" in own):
        if not own or "tools" not in own:
            raise ConfigError(
                f"chat_template: the tokenizer of {model_ref} has no chat template that renders `tools`; "
                "use auto or skillbook"
            )
        return "the model's own"
    added = tc.add_tool_tokens(tok)
    if added and cfg.method == "lora":  # new embedding rows would stay untrained under a frozen base
        raise ConfigError(
            f"method: lora cannot train the tool tokens {added} that Skillbook's template adds to the tokenizer "
            f"of {model_ref}; use method full, or a model whose template renders tools (chat_template auto)"
        )
    tok.chat_template = tc.TOOL_CHAT_TEMPLATE
    tok.response_template = tc.response_template(tok.eos_token)
    return "skillbook.ml.tool_calls.TOOL_CHAT_TEMPLATE" + (f" (+ tokens {' '.join(added)})" if added else "")


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    import torch
    from transformers import AutoConfig
    from trl import SFTConfig, SFTTrainer

    from skillbook.ml import tool_calls as tc
    from skillbook.ml import tool_traces as traces
    from skillbook.ml.evaluate import load_model_and_tokenizer
    from skillbook.ml.finetune_data import to_dataset
    from skillbook.ml.hf_models import count_params, load_causal_lm, load_tokenizer, lora_config, resolve_model
    from skillbook.ml.posttrain import log_callback, metric_history, quiet_trainer, trl_args

    # ---- the requests: seeded, held-out ones apart; a given model is checked before anything trains ----
    if cfg.arithmetic + cfg.eval_requests > traces.calculations(cfg.max_operand):
        raise ConfigError(
            f"arithmetic: {cfg.arithmetic} + eval_requests {cfg.eval_requests} exceed the "
            f"{traces.calculations(cfg.max_operand)} distinct calculations with max_operand={cfg.max_operand}; "
            "lower them or raise max_operand"
        )
    train_req, held, world = traces.make_requests(
        cfg.seed, cfg.arithmetic, cfg.eval_requests, cfg.max_operand, cfg.lookups
    )
    held = [r for r in held if r["kind"] == "arithmetic"] + [r for r in held if r["kind"] == "lookup"][
        : cfg.eval_requests
    ]
    facts = tc.fact_table(world)
    model_ref = resolve_model(cfg.model) if cfg.model else None
    if model_ref:
        AutoConfig.from_pretrained(model_ref)  # not a model: fails here, not after rendering

    # ---- the model: trained with the pretraining skill when none is given ------------------------------
    if model_ref is None:
        res = ctx.run_skill("pretraining", {"seed": cfg.seed, **cfg.pretrain})
        model_ref = res["outputs"]["model"]["path"]
        ctx.info(f"trained the start model ({res['summary']['params'] / 1e6:.2f}M params) into {model_ref}")
    tok = load_tokenizer(model_ref)
    template = pick_template(cfg, tok, model_ref)

    # ---- traces -> tokenized rows through the real apply_chat_template(tools=...) ---------------------
    rows = traces.sft_rows(tok, train_req, cfg.direct_answers)
    n_ctx = int(getattr(AutoConfig.from_pretrained(model_ref), "max_position_embeddings", 0) or cfg.max_length)
    longest = max(len(r["input_ids"]) for r in rows + traces.sft_rows(tok, held, False))
    if longest > min(cfg.max_length, n_ctx):
        what = "max_length" if cfg.max_length < n_ctx else f"model (its context is {n_ctx} tokens)"
        raise ConfigError(
            f"{what}: the longest rendered trace has {longest} tokens, more than min(max_length={cfg.max_length}, "
            f"context={n_ctx}); lower max_operand, raise max_length, or use a model with a longer context"
        )
    if ctx.is_main:
        out = ctx.out_dir / "traces"
        out.mkdir(parents=True, exist_ok=True)
        (out / "tools.json").write_text(json.dumps(tc.TOOLS, indent=2) + "\n")
        for name, reqs in (("train", train_req), ("test", held)):
            with open(out / f"{name}.jsonl", "w") as fh:
                for r in reqs:
                    fh.write(json.dumps({**r, "messages": traces.trace(r, r["answer"])}) + "\n")
    ctx.info(
        f"template: {template}; {len(train_req)} train requests -> {len(rows)} rows (longest {longest} tokens), "
        f"{len(held)} held-out requests"
    )

    # ---- SFT on pre-tokenized rows: TRL builds labels from completion_mask (assistant turns only) ------
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(model_ref, weights=cfg.precision.weights)
    model.generation_config.pad_token_id = tok.pad_token_id
    if len(tok) > model.get_input_embeddings().weight.shape[0]:  # the added tool tokens get embedding rows
        model.resize_token_embeddings(len(tok))
    args = SFTConfig(**trl_args(cfg, ctx.out_dir / "trainer", max_length=cfg.max_length, completion_only_loss=True))
    trainer = SFTTrainer(
        model=model,
        args=args,
        processing_class=tok,
        peft_config=lora_config(cfg.lora) if cfg.method == "lora" else None,
        train_dataset=to_dataset(rows, ("input_ids", "completion_mask")),
        callbacks=[log_callback(ctx, cfg.steps)],
    )
    quiet_trainer(trainer)
    trainable, total = count_params(trainer.model)
    ctx.info(f"method={cfg.method}: training {trainable:,} of {total:,} parameters")
    trainer.train()
    losses = metric_history(trainer, "loss")
    if not ctx.is_main:
        return {}
    model_dir = ctx.out_dir / "model"
    tuned = trainer.model.merge_and_unload() if cfg.method == "lora" else trainer.model
    tuned.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)  # with the tool template: what serving and the next user load

    # ---- measure on the reloaded model: the executor loop with tools, the bare answer without --------
    model, tok = load_model_and_tokenizer(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    records = traces.answer_with_tools(model, tok, held, facts, cfg.call_tokens, cfg.answer_tokens)
    direct = traces.answer_directly(model, tok, held, cfg.answer_tokens)
    scores = traces.score(held, records, direct)
    for rec, d in zip(records, direct):
        rec["direct"] = d
    (ctx.out_dir / "tool_eval.json").write_text(json.dumps({"scores": scores, "records": records}, indent=2) + "\n")
    ctx.summary.update(
        train_rows=len(rows),
        train_loss_first=losses[0] if losses else float("nan"),
        train_loss_last=losses[-1] if losses else float("nan"),
        trainable_params=trainable,
        **{f"{k}_{m}": v for k, s in scores.items() for m, v in s.items()},
    )
    return {"model": model_dir, "traces": ctx.out_dir / "traces", "report": write_report(cfg, ctx, scores, records)}


def write_report(cfg: Config, ctx: RunContext, scores: dict, records: list[dict]) -> Path:
    lines = [
        "# tool-use",
        "",
        f"{ctx.summary['train_rows']} SFT rows, {cfg.steps} steps x {cfg.batch_size}, method {cfg.method}; "
        f"train loss {ctx.summary['train_loss_first']:.3f} -> {ctx.summary['train_loss_last']:.3f}. Held-out "
        "requests, greedy; with tools = the executor loop (call -> Python -> result -> answer), without = the "
        "same model asked with no tools.",
        "",
        "| requests | n | valid call | correct arguments | exact match with tools | exact match without tools |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, s in scores.items():
        lines.append(
            f"| {kind} | {s['n']} | {s['valid_call']:.3f} | {s['correct_args']:.3f} | {s['em_tools']:.3f} | "
            f"{s['em_direct']:.3f} |"
        )
    lines += ["", "Samples:", ""]
    for rec in records[:3] + records[-3:]:
        lines.append(
            f"- `{rec['question']}` -> `{rec['generation'].strip()}` -> `{rec['result']}` -> "
            f"`{rec['answer'].strip()}` (expected `{rec['expected']}`; without tools `{rec['direct'].strip()}`)"
        )
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[4:-8]))
    return ctx.out_dir / "report.md"
