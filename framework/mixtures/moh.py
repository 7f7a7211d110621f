"""Mixture-of-Head attention (MoH, Jin et al., 2024).

Heads are split into ``n_shared`` shared heads (always on) and ``H − n_shared`` routed heads of which
``top_k`` are active per token. Each head's output is weighted before the output projection:

* ``variant="router"`` (trainable routers): shared gates ``h_s · softmax(W_s x)``; routed
  ``p = softmax(W_r x)``, top-k, renormalised over the chosen and scaled by k; two-stage weights
  ``[a1, a2] = 2·softmax(W_h x)`` multiply the shared and routed gates. Balance loss
  ``coef · R·Σ fᵢPᵢ`` over the R routed heads (= coef · k under perfect balance).
  With all routers at zero every active head's weight is exactly 1 (a dense layer's behaviour).
* ``variant="qnorm"`` (parameter-free, to continue-tune a dense model): routed heads are scored by the
  norm of their query ``‖q_h‖`` before RoPE, normalised by their spread over the routed heads,
  softmaxed, top-k, and used as a binary mask; shared heads are a fixed set with weight 1.

Execution (``execution``): ``"routed"`` (default) computes only the pairs the router picks — the shared
heads in one call of the layer's inner attention (local or context-parallel, any strategy), the routed
heads on the gathered queries of the tokens routed to them against the full keys, every routed head and
batch row of a window in one padded call (:func:`longreach.mixtures.routed.routed_attention`; under
context parallelism the routed heads pass K/V chunks of S/P tokens round the cp group as a ring).
``"masked"`` computes every head and multiplies the unrouted ones by zero (one inner call; the reference
the routed execution is tested against). Both give the same output and gradients; an inner attention
that is not one of ours (a foreign callable) always runs masked.
:func:`moh_from_dense` turns a dense attention layer into MoH keeping its q/k/v/o weights (routers zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longreach.attention import AttentionContext, LocalAttention
from longreach.errors import ConfigError
from longreach.models.config import MOH_EXECUTIONS, MOH_VARIANTS
from longreach.models.rope import apply_rotary

from .routed import routed_attention, supports_routed
from .routing import at_least_f32, RoutingTap, balance_loss, top_k_gates

__all__ = ["MoHConfig", "MoHAttention", "moh_from_dense", "EXECUTIONS", "VARIANTS"]

VARIANTS = MOH_VARIANTS
EXECUTIONS = MOH_EXECUTIONS


@dataclass(kw_only=True, slots=True)
class MoHConfig:
    dim: int
    """Model width."""
    n_heads: int
    """Query heads H (shared + routed)."""
    n_kv_heads: int
    """Key/value heads (GQA); divides n_heads."""
    head_dim: int
    """Per-head size."""
    n_shared: int
    """Shared heads (the first n_shared heads), always active."""
    top_k: int
    """Routed heads active per token (0 only when every head is shared)."""
    variant: str = "router"
    """router (trainable gates) or qnorm (parameter-free, query-norm scores, binary mask)."""
    balance_coef: float = 0.01
    """Coefficient of the routed heads' load-balance loss (variant router)."""
    execution: str = "routed"
    """routed (compute only the routed (token, head) pairs) or masked (every head, unrouted ones zeroed)."""

    def __post_init__(self) -> None:
        if self.n_heads < 1 or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"moh: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if not 0 <= self.n_shared <= self.n_heads:
            raise ConfigError(f"moh.shared must be in 0..n_heads={self.n_heads}, got {self.n_shared}")
        routed = self.n_heads - self.n_shared
        if routed == 0 and self.top_k != 0:
            raise ConfigError(f"moh.top_k must be 0 when every head is shared, got {self.top_k}")
        if routed > 0 and not 1 <= self.top_k <= routed:
            raise ConfigError(f"moh.top_k must be in 1..{routed} (the routed heads), got {self.top_k}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"moh.variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"moh.execution must be one of {', '.join(EXECUTIONS)}; got {self.execution!r}")
        if self.balance_coef < 0:
            raise ConfigError(f"moh.balance_coef must be >= 0, got {self.balance_coef}")

    @property
    def n_routed(self) -> int:
        return self.n_heads - self.n_shared


class MoHAttention(nn.Module):
    """``forward(x [B,S,dim], cos, sin [B,S,hd/2], ctx) -> [B,S,dim]``; ``head_gates`` [B,S,H] after it."""

    def __init__(self, cfg: MoHConfig, *, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.dim, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.dim, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.dim, bias=False)
        router = cfg.variant == "router"
        self.router_shared = nn.Linear(cfg.dim, cfg.n_shared, bias=False) if router and cfg.n_shared > 0 else None
        self.router_routed = nn.Linear(cfg.dim, cfg.n_routed, bias=False) if router and cfg.n_routed > 0 else None
        two_stage = router and cfg.n_shared > 0 and cfg.n_routed > 0
        self.router_mix = nn.Linear(cfg.dim, 2, bias=False) if two_stage else None
        self.inner_attention = LocalAttention("auto")
        self.routing_tap: RoutingTap | None = None
        self.aux_loss: torch.Tensor | None = None
        self.head_gates: torch.Tensor | None = None
        self.routed_active: torch.Tensor | None = None
        self.zero_routers()

    @torch.no_grad()
    def zero_routers(self) -> None:
        """Zero every router: all active heads get weight 1 (a dense layer's output with all shared)."""
        for r in (self.router_shared, self.router_routed, self.router_mix):
            if r is not None:
                r.weight.zero_()

    def gates(self, x: torch.Tensor, q_pre_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head output weights ``[B, S, H]`` and the balance loss (None for qnorm / no routed heads).

        Also sets :attr:`routed_active` ``[B, S, R]`` bool: the routed heads each token chose.

        Args:
            x: ``[B, S, dim]`` layer input; q_pre_rope: ``[B, S, H, D]`` queries before RoPE.
        """
        c = self.cfg
        b, s, _ = x.shape
        hs, r, k = c.n_shared, c.n_routed, c.top_k
        g_shared = x.new_ones(b, s, hs, dtype=torch.promote_types(x.dtype, torch.float32))  # [B, S, hs]
        g_routed = x.new_zeros(b, s, r, dtype=torch.promote_types(x.dtype, torch.float32))  # [B, S, R]
        aux = None
        active = torch.zeros(b, s, r, dtype=torch.bool, device=x.device)  # [B, S, R]
        if c.variant == "router":
            if hs > 0:
                g_shared = hs * at_least_f32(self.router_shared(x)).softmax(-1)  # [B, S, hs]
            if r > 0:
                p = at_least_f32(self.router_routed(x)).softmax(-1).reshape(b * s, r)  # [N, R]
                w, idx = top_k_gates(p, k)  # [N, k]
                g_routed = torch.zeros_like(p).scatter(1, idx, k * w).view(b, s, r)  # [B, S, R]
                active = active.view(b * s, r).scatter(1, idx, True).view(b, s, r)
                aux = c.balance_coef * balance_loss(p, idx)
            if self.router_mix is not None:
                a = 2 * at_least_f32(self.router_mix(x)).softmax(-1)  # [B, S, 2]
                g_shared, g_routed = g_shared * a[..., :1], g_routed * a[..., 1:]
        elif r > 0:
            score = at_least_f32(q_pre_rope[:, :, hs:]).norm(dim=-1)  # [B, S, R]
            spread = score.std(-1, keepdim=True, unbiased=False).clamp_min(1e-6)
            p = ((score - score.mean(-1, keepdim=True)) / spread).softmax(-1)  # [B, S, R]
            idx = p.topk(k, dim=-1).indices  # [B, S, k]
            g_routed = torch.zeros_like(p).scatter(-1, idx, 1.0)  # binary mask
            active = active.scatter(-1, idx, True)
        self.routed_active = active
        return torch.cat([g_shared, g_routed], dim=-1), aux  # [B, S, H]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(b, s, h, d)  # [B, S, H, D]
        k = self.k_proj(x).view(b, s, hkv, d)  # [B, S, Hkv, D]
        v = self.v_proj(x).view(b, s, hkv, d)  # [B, S, Hkv, D]
        g, aux = self.gates(x, q)  # [B, S, H]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        lctx = ctx.for_layer(self.layer_idx)
        if self.routing_tap is not None:
            self.routing_tap.record(q, k, lctx, self.inner_attention)
        out = self._attend(q, k, v, lctx)  # [B, S, H, D]
        out = out * g.to(out.dtype)[..., None]  # per-head weights before o_proj
        self.aux_loss = aux
        self.head_gates = g.detach()
        return self.o_proj(out.reshape(b, s, h * d))  # [B, S, dim]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Per-head outputs ``[B, S, H, D]``; with routed execution unrouted (token, head) pairs are 0."""
        c = self.cfg
        inner = self.inner_attention
        if c.execution == "masked" or c.n_routed == 0 or not supports_routed(inner):
            return inner(q, k, v, ctx)
        hs, group = c.n_shared, c.n_heads // c.n_kv_heads
        parts = []
        extra = inner.extra_mask(ctx)
        if hs > 0 and extra is not None and extra.per_head:
            parts.append(inner(q, k, v, ctx)[:, :, :hs])  # a per-head pattern is defined over all H heads
        elif hs > 0:
            # shared heads: one dense call; K/V heads up to the last one a shared head reads (the query
            # heads up to that GQA group boundary are computed and the extra ones dropped)
            kv_used = -(-hs // group)
            parts.append(inner(q[:, :, :kv_used * group], k[:, :, :kv_used], v[:, :, :kv_used], ctx)[:, :, :hs])
        parts.append(routed_attention(q[:, :, hs:], k, v, self.routed_active, first_head=hs, num_heads=c.n_heads,
                                      inner=inner, ctx=ctx))  # [B, S, R, D]
        return torch.cat(parts, dim=2)  # [B, S, H, D]


@torch.no_grad()
def moh_from_dense(layer: nn.Module, *, n_shared: int, top_k: int, variant: str = "router",
                   balance_coef: float = 0.01) -> MoHAttention:
    """A MoH layer with ``layer``'s q/k/v/o weights (and inner attention); routers zero.

    Args:
        layer: a dense attention layer with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (bias-free
            Linear), ``n_heads``, ``n_kv_heads``, ``head_dim`` (e.g. ``longreach.models.llama.Attention``).
        n_shared, top_k, variant, balance_coef: see :class:`MoHConfig`.

    Returns:
        The MoH layer (same device and dtype). With ``n_shared = n_heads`` it computes what ``layer`` does.
    """
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "n_kv_heads", "head_dim"):
        if not hasattr(layer, name):
            raise TypeError(f"moh_from_dense: {type(layer).__name__} has no '{name}'")
    cfg = MoHConfig(dim=layer.q_proj.in_features, n_heads=layer.n_heads, n_kv_heads=layer.n_kv_heads,
                    head_dim=layer.head_dim, n_shared=n_shared, top_k=top_k, variant=variant,
                    balance_coef=balance_coef)
    w = layer.q_proj.weight
    moh = MoHAttention(cfg, layer_idx=getattr(layer, "layer_idx", 0)).to(device=w.device, dtype=w.dtype)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(moh, name).weight.copy_(getattr(layer, name).weight)
    moh.zero_routers()
    moh.inner_attention = layer.inner_attention
    return moh
