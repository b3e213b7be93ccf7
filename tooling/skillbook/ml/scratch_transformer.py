"""A decoder-only transformer (a Llama, by default) in one readable file of plain PyTorch.

Read it top to bottom: tokens -> embeddings (+ a positional encoding) -> N pre-norm blocks of
(multi-head causal self-attention, SwiGLU MLP), each added to a residual stream -> a final norm -> the LM
head's logits over the vocabulary. With `positional="rope"` and `norm="rms"` (the defaults) every tensor
and every operation is the one transformers' LlamaForCausalLM uses, so `from_llama_state_dict` loads a real
Llama checkpoint and the logits agree to float rounding. Nothing here imports transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn


# ---- tokens: text <-> ids ---------------------------------------------------------------------------------
class CharTokenizer:
    """One id per character seen in training (nanoGPT's shakespeare_char); id 0 = unknown, 1 = end of text.
    Tiny vocabulary, long sequences: ~4x more positions per text than BPE, so attention has more to do."""

    def __init__(self, chars: str):
        self.itos = ["\ufffd", "\n\n"] + sorted(set(chars) - {"\ufffd"})
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size, self.eos_id = len(self.itos), 1

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, 0) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)


# ---- config: every size in one place --------------------------------------------------------------------
@dataclass
class ScratchConfig:
    vocab_size: int = 256
    d_model: int = 64  # width of the residual stream
    n_layer: int = 2
    n_head: int = 4  # query heads; head size = d_model / n_head
    n_kv_head: int = 0  # key/value heads (GQA); 0 = n_head (plain multi-head attention)
    d_ff: int = 0  # MLP hidden width; 0 = about 8/3 d_model (3 SwiGLU matrices ~ a 4x MLP's 2 in params)
    max_seq_len: int = 128  # the learned/sinusoidal tables' length; RoPE itself has no limit
    positional: Literal["rope", "learned", "sinusoidal"] = "rope"
    rope_theta: float = 10000.0  # RoPE's base: larger = slower rotations = longer usable context
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    tie_embeddings: bool = False  # share the input embedding and the LM head (GPT-2, small Llamas)

    def __post_init__(self) -> None:
        self.n_kv_head = self.n_kv_head or self.n_head
        self.d_ff = self.d_ff or 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("d_model must divide by n_head, and n_head by n_kv_head")
        if self.positional == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError("rope rotates pairs of dimensions: the head size d_model / n_head must be even")

    @classmethod
    def from_llama(cls, c: Any) -> ScratchConfig:
        """The sizes of a transformers LlamaConfig (read by attribute name: no import needed)."""
        if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
            raise ValueError("head_dim != hidden_size / num_attention_heads is not supported here")
        theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta")
        return cls(
            vocab_size=c.vocab_size, d_model=c.hidden_size, n_layer=c.num_hidden_layers,
            n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads, d_ff=c.intermediate_size,
            max_seq_len=c.max_position_embeddings, rope_theta=float(theta or 10000.0), norm_eps=c.rms_norm_eps,
            tie_embeddings=bool(c.tie_word_embeddings),
        )  # fmt: skip


# ---- positional encodings ----------------------------------------------------------------------------------
# Attention alone is order-blind (a set operation). Three ways to tell it where each token is:
# learned: a trained vector per position, added to the token embedding (GPT-2); cannot go past max_seq_len.
# sinusoidal: fixed sin/cos waves of geometric wavelengths, added the same way (Vaswani et al. 2017).
# rope: rotate each (query, key) pair of dimensions by an angle proportional to the position, so q.k depends
#   only on the *relative* distance (Su et al. 2021; Llama, Mistral, Qwen). Nothing is added to the embedding.
def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return table


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [seq_len, head_dim]: dimension i and i + head_dim/2 share frequency theta^(-2i/d)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # Llama's layout: the two halves, not interleaved pairs
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every (x_i, x_{i+d/2}) pair of a [B, H, T, d] tensor by its position's angle (2-D rotation:
    x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin). Llama calls the middle step rotate_half."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---- normalisation ---------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean and the bias (Zhang & Sennrich 2019; Llama).
    Computed in fp32 whatever the input dtype, as Llama does: a mean of bf16 squares loses precision."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ScratchConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


# ---- attention ---------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d) + causal mask) V, written out; returns (output, probabilities [B, H, T, T]).

    Dividing by sqrt(d) keeps the dot products' variance near 1, so the softmax does not saturate at init.
    The mask sets every score of a *later* key to -inf: position t sees positions <= t only (causal LM).
    F.scaled_dot_product_attention(q, k, v, is_causal=True) computes the same, fused and faster."""
    t = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).float().softmax(dim=-1).to(q.dtype)
    return probs @ v, probs


class CausalSelfAttention(nn.Module):
    """Multi-head attention: each head attends in its own head_dim subspace; o mixes the heads back.
    With GQA (n_kv_head < n_head) groups of query heads share one key/value head: a smaller KV cache."""

    def __init__(self, cfg: ScratchConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.d_model // cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)  # Llama: no biases anywhere
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        # [B, T, H*d] -> [B, H, T, d]: heads become a batch dimension
        q = self.q(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:  # rotate queries and keys only: values carry content, not position
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        group = self.n_head // self.n_kv_head  # query heads 0..group-1 share kv head 0, and so on
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out, probs = attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, t, -1)), probs


# ---- MLP and block ------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP (Shazeer 2020); the gate lets each unit switch itself off."""

    def __init__(self, cfg: ScratchConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). The residual stream itself is never normalised,
    so gradients reach early layers unchanged: deep pre-norm stacks train without warmup tricks."""

    def __init__(self, cfg: ScratchConfig):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.mlp_norm, self.mlp = make_norm(cfg), SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        a, probs = self.attn(self.attn_norm(x), rope)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), probs


# ---- the model: embeddings -> blocks -> norm -> LM head -------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, cfg: ScratchConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positional == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.positional == "sinusoidal":  # a buffer: moves with .to(device) but is not trained or saved
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for m in self.modules():  # N(0, 0.02) as GPT-2 and Llama's initializer_range; before tying, so once
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, return_attn: bool = False) -> Any:
        """Token ids [B, T] -> logits [B, T, vocab] (and each layer's attention probabilities if asked)."""
        t = idx.shape[1]
        x = self.tok_emb(idx)
        rope = None
        if self.cfg.positional == "learned":
            x = x + self.pos_emb(torch.arange(t, device=idx.device))
        elif self.cfg.positional == "sinusoidal":
            x = x + self.get_buffer("pos_table")[:t]
        else:
            rope = rope_cos_sin(t, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta, idx.device)
        attns = []
        for block in self.blocks:
            x, probs = block(x, rope)
            attns.append(probs)
        logits = self.lm_head(self.norm(x))
        return (logits, attns) if return_attn else logits

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """Sample one token at a time, feeding the sequence back in. No KV cache: every step recomputes the
        whole prefix (quadratic, but nothing to get wrong); real servers cache each layer's keys and values."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.max_seq_len :])[:, -1, :].float()  # the context it was trained on
            if top_k is not None:  # keep the k most likely tokens, so the long tail is never sampled
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if temperature == 0:  # greedy
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


# ---- loading a real Llama checkpoint: only the names differ ------------------------------------------------
RENAMES = (  # e.g. model.layers.3.self_attn.q_proj.weight -> blocks.3.attn.q.weight
    ("model.embed_tokens.", "tok_emb."),
    ("model.layers.", "blocks."),
    ("self_attn.", "attn."),
    ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "mlp_norm."),
    ("_proj.", "."),  # q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    ("model.norm.", "norm."),
)


def our_name(llama_key: str) -> str:
    for old, new in RENAMES:
        llama_key = llama_key.replace(old, new)
    return llama_key


def from_llama_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state_dict under this file's names; `load_state_dict` then checks that every tensor
    arrived with its shape. A tied checkpoint may lack lm_head.weight: the embedding stands in. The other way:
    `llama.load_state_dict({k: ours[our_name(k)] for k in llama.state_dict()})`."""
    out = {our_name(key): value for key, value in sd.items()}
    out.setdefault("lm_head.weight", out["tok_emb.weight"])
    return out
