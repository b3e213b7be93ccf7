"""Typed config blocks several recipes share: `LoRA`, `Optim`, `Precision`, `Logging`.

A recipe holds a block as one nested field with its own defaults, e.g.
`optim: Optim = Field(Optim(lr=1e-3), description=...)`, and users change one value with
`--set optim.lr=3e-4` or `optim: {lr: 3e-4}` in a preset. `BlockConfig` is the Config base for
such recipes: a partial block is laid over the recipe's default block (so `--set optim.lr=...`
keeps that recipe's warmup), and its JSON Schema shows the recipe's defaults inside the block.
Only pydantic is imported here, so `skills list/lint` stay fast.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from skillbook.run.recipe import RecipeConfig

# PEFT's keyword for every Linear/Conv1D layer but the output head, whatever the family names them.
ALL_LINEAR: Literal["all-linear"] = "all-linear"

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class Block(BaseModel):
    """Base of a shared block: unknown keys are errors; a block is a value, never edited in place."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Names users bring from TRL/PEFT (or from the flat configs before blocks) -> this block's field.
    aliases: ClassVar[dict[str, str]] = {}


class LoRA(Block):
    """The LoRA adapter (PEFT LoraConfig): a trainable low-rank update B @ A on each target matrix."""

    aliases: ClassVar[dict[str, str]] = {"lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets"}

    r: int = Field(16, ge=1, le=1024, description="Rank of the update per target matrix (PEFT's r).")
    alpha: int = Field(
        32,
        ge=1,
        le=4096,
        description="Scale: the update is multiplied by alpha/r; alpha = 2r keeps it at 2 as r changes.",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input; 0 for tiny runs, 0.05-0.1 on real data."
    )
    targets: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = Field(
        ALL_LINEAR,
        description="Layers that get adapters: 'all-linear' (every linear layer but the output head, as PEFT "
        "finds them: q_proj..down_proj on Llama, c_attn/c_proj/c_fc on GPT-2) or module-name suffixes, "
        "e.g. q_proj,v_proj; a suffix that matches no layer of the model is refused before it loads.",
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        """`--set lora.targets=c_attn,c_proj` (one string) -> a list; any spelling of all-linear -> the keyword."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and [str(v).lower() for v in value] == [ALL_LINEAR]:
            return ALL_LINEAR
        return value


class Optim(Block):
    """AdamW and its learning-rate schedule, as the TRL trainers run them."""

    aliases: ClassVar[dict[str, str]] = {
        "learning_rate": "lr",
        "lr_scheduler_type": "schedule",
        "adam_beta1": "betas",
        "adam_beta2": "betas",
        "max_grad_norm": "grad_clip",
    }

    lr: float = Field(2e-3, gt=0.0, le=1.0, description="Peak learning rate (after warmup).")
    schedule: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine",
        description="Decay after warmup (TRL's lr_scheduler_type): cosine to 0, linear to 0, or held constant.",
    )
    warmup_ratio: float = Field(
        0.05, ge=0.0, lt=1.0, description="Fraction of the steps spent ramping the lr up from 0 (rounded up)."
    )
    weight_decay: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Decoupled AdamW weight decay. 0 (TRL's default) for LoRA, where decay pulls the adapter "
        "back to the base; 0.01-0.1 for long full fine-tunes.",
    )
    betas: tuple[Beta, Beta] = Field(
        (0.9, 0.999), description="AdamW (beta1, beta2), TRL's defaults; beta2 0.95 steadies long or large-batch runs."
    )
    grad_clip: float = Field(
        1.0, ge=0.0, description="Clip the global gradient norm to this (TRL's max_grad_norm); 0 = no clipping."
    )


class Precision(Block):
    """Which dtypes a run trains in: the weights as loaded, and the mixed-precision autocast TRL applies."""

    aliases: ClassVar[dict[str, str]] = {"bf16": "dtype", "fp16": "dtype", "torch_dtype": "weights"}

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Mixed-precision compute (TRL's bf16/fp16 flags). auto = bfloat16 on a CUDA GPU that "
        "supports it, else float32 (on a tiny CPU run bf16 only costs time); float16 needs CUDA.",
    )
    weights: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype the base weights load in. auto = bfloat16 on CUDA, float32 on CPU. Under QLoRA the "
        "linear layers load in 4-bit NF4 and compute in bfloat16 instead.",
    )


class Logging(Block):
    """How often TRL's metrics reach the run's metrics.jsonl, and which external trackers also get them."""

    aliases: ClassVar[dict[str, str]] = {"logging_steps": "every"}

    every: int = Field(5, ge=1, description="Log TRL's metrics every N optimizer steps (TRL's logging_steps).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Trackers that also receive the metrics (TRL's report_to); empty = none. tensorboard writes "
        "inside the run dir; the others need their package and may upload.",
    )


class BlockConfig(RecipeConfig):
    """A RecipeConfig with block fields: partial blocks overlay the recipe's defaults (also in the schema)."""

    @model_validator(mode="before")
    @classmethod
    def _overlay_block_defaults(cls, data: Any) -> Any:
        """`optim: {lr: 1e-4}` keeps the recipe's other optim defaults instead of the block class's."""
        if not isinstance(data, dict):
            return data
        blocks = cls.block_defaults()
        moved = [hint for key in data if key not in cls.model_fields and (hint := cls._block_path(key, blocks))]
        for name, default in blocks.items():
            if isinstance(data.get(name), dict):
                aliases = type(default).aliases
                moved += [
                    f"unknown field '{name}.{k}'; did you mean '{name}.{aliases[k]}'?"
                    for k in data[name]
                    if k in aliases
                ]
        if moved:
            raise ValueError("; ".join(moved))
        out = dict(data)
        for name, default in blocks.items():
            if isinstance(out.get(name), dict):
                out[name] = {**default.model_dump(), **out[name]}
        return out

    @staticmethod
    def _block_path(key: str, blocks: dict[str, Block]) -> str | None:
        """The hint for a top-level key that lives in a block: `lr` -> optim.lr, `lora_r` -> lora.r."""
        for name, default in blocks.items():
            fields, aliases = type(default).model_fields, type(default).aliases
            rest = key.removeprefix(f"{name}_")
            for candidate in (key, rest):
                if candidate in fields or candidate in aliases:
                    return f"unknown field '{key}'; did you mean '{name}.{aliases.get(candidate, candidate)}'?"
        return None

    @classmethod
    def block_defaults(cls) -> dict[str, Block]:
        """Field name -> default block, for the block fields of this Config."""
        return {name: f.default for name, f in cls.model_fields.items() if isinstance(f.default, Block)}

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The schema, with each block's properties showing this recipe's defaults (an editor's hover and
        the site's field table read them there), not the block class's."""
        schema = super().model_json_schema(*args, **kwargs)
        defs = schema.get("$defs", {})
        blocks = cls.block_defaults()
        for default in blocks.values():
            name = type(default).__name__
            same_type = [b for b in blocks.values() if type(b) is type(default)]
            if name not in defs or len(same_type) > 1:  # two fields of one block type: defaults may differ
                continue
            for key, value in default.model_dump(mode="json").items():
                defs[name]["properties"][key]["default"] = value
        return schema
