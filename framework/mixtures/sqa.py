"""Sparse Query Attention: fewer query heads than the model width implies.

With head size d, a dense layer has H = dim / d query heads; SQA keeps ``H_q < H`` of them (and
optionally fewer key/value heads, ``H_kv`` dividing ``H_q``), so the score and value FLOPs shrink by
H / H_q. The output projection maps ``H_q · d`` back to ``dim``. With ``H_q = H`` it is multi-head
(grouped-query) attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longreach.attention import AttentionContext, LocalAttention
from longreach.errors import ConfigError
from longreach.models.rope import apply_rotary

from .routing import RoutingTap

__all__ = ["SQAConfig", "SQAttention"]


@dataclass(kw_only=True, slots=True)
class SQAConfig:
    dim: int
    """Model width."""
    n_q_heads: int
    """Query heads H_q (H_q < dim / head_dim for a saving)."""
    n_kv_heads: int
    """Key/value heads; divides n_q_heads."""
    head_dim: int
    """Per-head size d (that of the dense model)."""

    def __post_init__(self) -> None:
        if self.n_q_heads < 1 or self.n_kv_heads < 1 or self.n_q_heads % self.n_kv_heads:
            raise ConfigError(f"sqa.kv_heads={self.n_kv_heads} must be >= 1 and divide sqa.q_heads={self.n_q_heads}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"sqa head_dim must be even, got {self.head_dim}")


class SQAttention(nn.Module):
    """``forward(x [B,S,dim], cos, sin [B,S,d/2], ctx) -> [B,S,dim]`` through the inner-attention seam."""

    def __init__(self, cfg: SQAConfig, *, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_q_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_q_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_q_heads * cfg.head_dim, cfg.dim, bias=False)
        self.inner_attention = LocalAttention("auto")
        self.routing_tap: RoutingTap | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rotary(self.q_proj(x).view(b, s, hq, d), cos, sin)  # [B, S, Hq, D]
        k = apply_rotary(self.k_proj(x).view(b, s, hkv, d), cos, sin)  # [B, S, Hkv, D]
        v = self.v_proj(x).view(b, s, hkv, d)  # [B, S, Hkv, D]
        lctx = ctx.for_layer(self.layer_idx)
        if self.routing_tap is not None:
            self.routing_tap.record(q, k, lctx, self.inner_attention)
        out = self.inner_attention(q, k, v, lctx)  # [B, S, Hq, D]
        return self.o_proj(out.reshape(b, s, hq * d))  # [B, S, dim]
