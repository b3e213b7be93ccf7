"""Logit distillation: a smaller student learns the teacher's next-token distribution, against the same
student trained from scratch on the same tokens.

Story: check the inputs (a given student must share the teacher's tokenizer) -> the teacher (trained with
the pretraining skill when not given) -> the student's config: the teacher's family with fewer layers or a
narrower width -> two runs from the same init, on the same batches in the same order: distilled (T^2 x
KL(teacher || student) at temperature T, plus ce_weight x CE) and from scratch (CE only) -> val loss of
teacher and both students on the same held-out windows, held-out exact match -> both students saved as
hf-models, report.md. A plain torch loop (nanoGPT style): TRL's DistillationTrainer and GKDTrainer take
prompt/chat rows and generate completions on-policy, not packed corpus windows, and cannot run the
CE-only baseline on the same batches.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from skillbook.errors import ConfigError
from skillbook.ml.data_files import CorpusPath, EvalDataPath, corpus_sources
from skillbook.run.recipe import RecipeConfig, artifact_path
from skillbook.run.runner import RunContext

OUTPUTS = {"model": "hf-model", "scratch_model": "hf-model", "report": "report"}
INPUTS = {"teacher": "hf-model", "student": "hf-model", "corpus": "corpus", "eval_data": "sft-data"}


class Config(RecipeConfig):
    """The defaults are the CPU-tiny run: teacher = the pretraining default (0.98M, 4 x 128, trained here),
    student = 2 x 128 of the same family and tokenizer, 150 steps x 16 windows of 128 tokens, ~2 min."""

    teacher: str | None = Field(
        None,
        description="Teacher hf-model dir or hub id; None = train the pretraining default on corpus (on the "
        "student's tokenizer when student is given).",
    )
    teacher_train: dict[str, Any] = Field(
        default_factory=dict, description="pretraining overrides for a trained teacher (e.g. {max_steps: 600})."
    )
    student: str | None = Field(
        None,
        description="Student init: an hf-model on the teacher's tokenizer (e.g. Llama-3.2-1B for Llama-3.1-8B); "
        "None = a random-init student of the teacher's family shaped by layers and width.",
    )
    layers: int | None = Field(None, ge=1, description="Student decoder blocks; None = half the teacher's.")
    width: int | None = Field(
        None, ge=16, description="Student hidden size (a multiple of the teacher's head size); None = the teacher's."
    )
    corpus: CorpusPath | None = Field(
        None, description="Corpus (folder with train/val, or one file); None = the embedded synthetic world."
    )
    val_fraction: float = Field(0.05, gt=0, le=0.5, description="Held-out share of a single corpus file.")
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature of both distributions (1-2; the loss is scaled by T^2)."
    )
    ce_weight: float = Field(
        0.0, ge=0, description="Weight of the hard-label CE term added to the KL term (0 = pure distillation)."
    )
    steps: int = Field(150, ge=1, description="Optimizer steps of each student (the same for both).")
    batch_size: int = Field(16, ge=1, description="Windows per step.")
    seq_len: int = Field(128, ge=8, description="Tokens per window (at most the teacher's context).")
    lr: float = Field(
        3e-3,
        gt=0,
        description="Peak AdamW learning rate of both students (3e-3 at 0.5M params: better than 6e-3 for both; "
        "1e-4 to 3e-5 for pretrained 1B students).",
    )
    warmup_steps: int = Field(15, ge=0, description="Linear warmup steps, then cosine decay to lr / 10.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices.")
    eval_windows: int = Field(32, ge=1, description="Held-out windows for the val loss of every model.")
    eval_data: EvalDataPath | None = Field(
        None,
        description="Held-out {prompt, completion} rows for exact match (a file, or a folder's test split); "
        "None = the embedded world's held-out questions (match the default corpus only).",
    )
    eval_questions: int = Field(64, ge=0, description="Held-out questions scored for exact match (0 = skip).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when a GPU is visible.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Autocast dtype; auto = bf16 on bf16 GPUs (and native-bf16 CPUs from 5M params)."
    )
    seed: int = Field(0, description="Seed: init, batch order and the default data; shared by both students.")


def pretrain(ctx: RunContext, sets: dict) -> Path:
    """Train the teacher with the pretraining skill, moved to run_dir/teacher/; returns its model dir."""
    res = ctx.run_skill("pretraining", sets)
    src, dest = ctx.out_dir / "pretraining", ctx.out_dir / "teacher"
    model = Path(res["outputs"]["model"]["path"]).relative_to(src)
    shutil.rmtree(dest, ignore_errors=True)
    src.rename(dest)
    ctx.info(f"trained the teacher ({res['summary']['params'] / 1e6:.2f}M params) into {dest}")
    return dest / model


def check_context(cfg: Config, t_config: Any) -> None:
    n_ctx = int(getattr(t_config, "max_position_embeddings", 0) or cfg.seq_len)
    if cfg.seq_len > n_ctx:
        raise ConfigError(f"seq_len: {cfg.seq_len} exceeds the teacher's context ({n_ctx} tokens); lower seq_len")


def run(cfg: Config, ctx: RunContext) -> dict[str, Path]:
    """Check, get the teacher, train both students on the same batches, measure and save.

    Long: the two students share the loop, the data and the teacher, so they read best in one place."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from skillbook.ml import distillation as kd
    from skillbook.ml import lm_data
    from skillbook.ml.hf_models import resolve_model
    from skillbook.ml.training import precision

    # ---- fail fast: one tokenizer for both, a student smaller than the teacher, before anything trains --
    teacher = resolve_model(cfg.teacher, "teacher") if cfg.teacher else None
    student = resolve_model(cfg.student, "student") if cfg.student else None
    if teacher and student and (why := kd.tokenizer_mismatch(teacher, student)):
        raise ConfigError(
            f"student: its tokenizer differs from the teacher's ({why}); student={student} cannot match the "
            f"distribution of teacher={teacher} token for token: pass a student on the teacher's tokenizer "
            f"(same family and release), or omit student to build one from the teacher's config"
        )
    if teacher:
        check_context(cfg, AutoConfig.from_pretrained(teacher))
        if not student:
            kd.student_config(AutoConfig.from_pretrained(teacher), cfg.layers, cfg.width)  # refuses a bad shape
    corpus = artifact_path(cfg.corpus, "corpus") if cfg.corpus else None
    if corpus is None:
        from skillbook.ml.synthetic import write_default_data

        corpus = write_default_data(ctx.out_dir / "data", seed=cfg.seed)["corpus"]

    # ---- the teacher (trained when missing), the student's init, the data ------------------------------
    device = ctx.setup_device(cfg.device)
    if teacher is None:  # on the student's tokenizer when a student is given, so their ids agree
        sets = {"corpus": str(corpus), "seed": cfg.seed, "tokenizer": student, **cfg.teacher_train}
        teacher = str(pretrain(ctx, sets))
        if student and (why := kd.tokenizer_mismatch(teacher, student)):
            raise ConfigError(f"student: the trained teacher's output does not match student={student} ({why})")
    tok = AutoTokenizer.from_pretrained(teacher)
    half = device.startswith("cuda") and cfg.dtype != "float32"  # a frozen teacher needs no fp32 master weights
    t_dtype = torch.bfloat16 if half else torch.float32
    t_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=t_dtype).eval()
    t_model.to(device)
    check_context(cfg, t_model.config)
    s_config = (
        AutoConfig.from_pretrained(student) if student else kd.student_config(t_model.config, cfg.layers, cfg.width)
    )
    s_config.use_cache = False
    train_texts, val_texts, note = corpus_sources(corpus, "corpus", cfg.val_fraction, cfg.seed)
    ctx.info(note)
    data = lm_data.load_tokens({"train": train_texts, "val": val_texts}, tok, cfg.seq_len)
    vx, vy = lm_data.eval_windows(data["val"], cfg.seq_len, cfg.eval_windows)

    def new_student():
        precision.seed_everything(cfg.seed)  # the same init for both runs
        if student:
            model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(s_config, dtype=torch.float32)
        model.to(device)  # type: ignore[arg-type]
        return model

    probe = new_student()
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (t_model, probe))
    dtype, _ = ctx.choose_dtype(cfg.dtype, n_student)
    del probe
    ctx.info(
        f"teacher {n_teacher / 1e6:.2f}M ({t_model.config.model_type}), student {n_student / 1e6:.2f}M; "
        f"{cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, T={cfg.temperature}, "
        f"ce_weight={cfg.ce_weight}, {device} {dtype}"
    )

    @torch.no_grad()
    def val_loss(model) -> float:
        model.eval()
        total = 0.0
        for i in range(0, len(vx), cfg.batch_size):
            with precision.autocast(device, dtype):
                logits = model(input_ids=vx[i : i + cfg.batch_size].to(device)).logits
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), vy[i : i + cfg.batch_size].to(device).flatten(), reduction="sum"
            ).item()
        return total / vy.numel()

    # ---- the loop: one function, two losses; the same windows in the same order for both ---------------
    def train(distil: bool) -> tuple[Any, list[dict]]:
        from skillbook.ml.training import optim

        model = new_student().train()
        opt = optim.adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.95))
        sampler = lm_data.WindowSampler(data["train"], cfg.seq_len, cfg.seed)
        name, hist = ("distilled" if distil else "scratch"), []
        ctx.progress(cfg.steps, f"student ({name})")
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = optim.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr / 10)
            x, y = (t.to(device) for t in sampler.windows(sampler.take(cfg.batch_size)))
            with precision.autocast(device, dtype):
                logits = model(input_ids=x).logits
                with torch.no_grad():  # the teacher's distribution, logged for the baseline too
                    t_logits = t_model(input_ids=x).logits
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            kl = kd.kd_loss(logits, t_logits, cfg.temperature)
            loss = kl + cfg.ce_weight * ce if distil else ce
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            hist.append({"step": step + 1, "loss": loss.item(), "kl": kl.item(), "ce": ce.item()})
            ctx.log(step=step + 1, **{f"{name}/{k}": v for k, v in hist[-1].items() if k != "step"})
        return model.eval(), hist

    results: dict[str, dict] = {"teacher": {"val_loss": val_loss(t_model), "params": n_teacher}}
    out: dict[str, Path] = {}
    for distil, name, key in ((True, "distilled", "model"), (False, "scratch", "scratch_model")):
        t0 = time.time()
        model, hist = train(distil)
        results[name] = {"val_loss": val_loss(model), "params": n_student, "seconds": time.time() - t0, "hist": hist}
        out[key] = ctx.out_dir / ("student" if distil else "scratch")
        model.config.use_cache = True
        model.save_pretrained(out[key])
        tok.save_pretrained(out[key])
        del model
    if cfg.eval_questions:
        models = {"teacher": Path(teacher), "distilled": out["model"], "scratch": out["scratch_model"]}
        exact_match(cfg, ctx, results, models)
    out["report"] = write_results(cfg, ctx, results)
    return out


def exact_match(cfg: Config, ctx: RunContext, results: dict, models: dict[str, Path]) -> None:
    """Greedy held-out exact match of each saved model, reloaded as a user loads it."""
    from skillbook.ml.data_files import read_rows
    from skillbook.ml.evaluate import exact_match as em
    from skillbook.ml.evaluate import load_model_and_tokenizer
    from skillbook.ml.finetune_data import QA, default_data, held_out_rows

    if cfg.eval_data is None:
        rows = read_rows(default_data(ctx, "eval_data") / "test.jsonl", "eval_data", QA)
    else:
        rows = held_out_rows(ctx, cfg.eval_data, "eval_data")
    rows = rows[: cfg.eval_questions]
    for name, path in models.items():
        model, tok = load_model_and_tokenizer(str(path))
        results[name]["exact_match"] = em(model, tok, rows)["exact_match"]


def mean_kl(hist: list[dict]) -> float:
    return sum(h["kl"] for h in hist) / len(hist)


def write_results(cfg: Config, ctx: RunContext, r: dict) -> Path:
    d, s = r["distilled"], r["scratch"]
    first_kl, last_kl = mean_kl(d["hist"][:5]), mean_kl(d["hist"][-5:])
    ctx.summary.update(
        teacher_params=r["teacher"]["params"],
        student_params=d["params"],
        teacher_val_loss=round(r["teacher"]["val_loss"], 4),
        distilled_val_loss=round(d["val_loss"], 4),
        scratch_val_loss=round(s["val_loss"], 4),
        val_loss_gain=round(s["val_loss"] - d["val_loss"], 4),
        kl_first=round(first_kl, 4),
        kl_last=round(last_kl, 4),
        scratch_kl_last=round(mean_kl(s["hist"][-5:]), 4),
        tokens_per_student=cfg.steps * cfg.batch_size * cfg.seq_len,
        **{f"{n}_exact_match": round(r[n]["exact_match"], 4) for n in r if "exact_match" in r[n]},
    )
    lines = [
        "# distillation",
        "",
        f"Teacher {r['teacher']['params'] / 1e6:.2f}M -> student {d['params'] / 1e6:.2f}M params, both students "
        f"from the same init on the same {cfg.steps} x {cfg.batch_size} windows of {cfg.seq_len} tokens "
        f"({ctx.summary['tokens_per_student']:,} tokens each); distilled = T^2 KL(teacher || student) at "
        f"T={cfg.temperature} + {cfg.ce_weight} x CE, scratch = CE only. Val loss on {cfg.eval_windows} held-out "
        "windows; KL = the student's KL to the teacher (mean of the last 5 steps).",
        "",
        "| model | params | val loss | exact match | KL to teacher | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("teacher", "distilled", "scratch"):
        m = r[name]
        em = f"{m['exact_match']:.3f}" if "exact_match" in m else "-"
        kl = f"{mean_kl(m['hist'][-5:]):.3f}" if "hist" in m else "-"
        secs = f"{m['seconds']:.0f}" if "seconds" in m else "-"
        lines.append(f"| {name} | {m['params'] / 1e6:.2f}M | {m['val_loss']:.4f} | {em} | {kl} | {secs} |")
    better = "beats" if d["val_loss"] < s["val_loss"] else "does not beat"
    lines += [
        "",
        f"The distilled student {better} the one trained from scratch by {s['val_loss'] - d['val_loss']:+.4f} "
        f"val loss at equal tokens; its KL to the teacher fell from {first_kl:.3f} to {last_kl:.3f}.",
    ]
    ctx.report("\n".join(lines) + "\n")
    ctx.info("\n".join(lines[4:]))
    return ctx.out_dir / "report.md"
