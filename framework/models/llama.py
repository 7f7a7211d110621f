"""Llama-style decoder written for one device: RMSNorm, RoPE, GQA, SwiGLU, tied or untied embeddings.

Parameter names follow HF Llama (``embed_tokens``, ``layers.i.self_attn.q_proj`` …, ``norm``,
``lm_head``) so checkpoints map one to one. Attention ends in the seam ``inner_attention(q, k, v, ctx)``
(framework/ARCHITECTURE.md §3); context parallelism, masks and kernels are swapped in from outside by
:func:`longreach.model_setup.parallelize`, never by branches here.

Forward::

    hidden = model(input_ids [B, S_local], position_ids [B, S_local], ctx)           # [B, S_local, dim]
    loss_sum, n_tokens = model(input_ids, position_ids, ctx, labels=labels)          # chunked CE

``position_ids`` are what RoPE rotates by (global positions, or per-document positions for packed
documents); ``ctx.positions`` (global positions of the local tokens) is what masks are placed with.
Logits for the loss are formed chunk by chunk from ``model.output_weight()`` (never ``[S, V]`` at once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longreach.attention import AttentionContext, LocalAttention

from .registry import ATTENTION_TYPES, FFN_TYPES, lookup, register_attention, register_ffn, register_model
from .base import DecoderLM
from .config import ModelConfig
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, computed in float32 at least."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dt)  # [B, S, dim]
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


@register_attention("mha")
class Attention(nn.Module):
    """Multi-head (grouped-query) self-attention ending in the ``inner_attention`` seam."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.inner_attention = LocalAttention("auto")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)  # [B, S, H, D]
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.inner_attention(q, k, v, ctx.for_layer(self.layer_idx))  # [B, S, H, D]
        return self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim))  # [B, S, dim]


@register_ffn("swiglu")
class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [B, S, dim]


class Block(nn.Module):
    """Pre-norm decoder block; ``parallel_block`` uses one norm for both branches: x + attn(n x) + ffn(n x)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.parallel = cfg.parallel_block
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = lookup(ATTENTION_TYPES, cfg.attention_type, "model.attention_type")(cfg, layer_idx)
        self.post_attention_layernorm = None if cfg.parallel_block else RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = lookup(FFN_TYPES, cfg.ffn_type, "model.ffn_type")(cfg, layer_idx)
        if hasattr(self.mlp, "bind_attention"):  # a feed-forward that routes by its block's attention (MoE)
            self.mlp.bind_attention(self.self_attn)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = self.input_layernorm(x)  # [B, S, dim]
        if self.parallel:
            return x + self.self_attn(h, cos, sin, ctx) + self.mlp(h)
        x = x + self.self_attn(h, cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(DecoderLM):
    """Decoder-only language model (see the module docstring for the forward contract)."""

    residual_out = ("o_proj.weight", "down_proj.weight")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def _blocks(self, h: torch.Tensor, position_ids: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None, ctx: AttentionContext
                ) -> tuple[torch.Tensor, nn.Module | None]:
        cos, sin = rope  # [B, S, hd/2] each
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)  # [B, S, dim]
        return h, self.norm  # the final norm runs inside the loss region


@register_model("llama")
def build_llama(cfg: ModelConfig) -> Llama:
    return Llama(cfg)
