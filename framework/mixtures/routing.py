"""Token routing shared by the mixture layers (MoE / MoH top-k with load balance).

* :func:`top_k_gates` — softmax gate, top-k, renormalised over the chosen.
* :func:`balance_loss` — E·Σ fᵢPᵢ with fᵢ the fraction of tokens that chose i (Σ fᵢ = k) and Pᵢ the
  mean router probability; it equals k under perfect balance.
* :func:`z_loss` — mean over tokens of logsumexp(logits)².
* Attention-aware routing (graph-of-tokens SMoE): P = A·softmax(W_r X) with A the preceding attention
  layer's head-averaged causal row-stochastic attention matrix. A is never formed: A·P is a second
  attention pass ``attention(q, k, P)`` with that layer's q, k, scale and mask — through the layer's
  own inner attention (the model seam), so context parallelism and masks apply unchanged.
  :class:`RoutingTap` carries q, k, ctx and that inner attention from the attention layer to the FFN.
  The pass is differentiable in q and k as well as in P: by default (``MoEConfig.routing_grad``) the
  routing gradient reaches the attention layer's projections, which is what autograd of the method's
  formula gives; treating A as a constant is the explicit alternative.
* Similarity-aware routing: P_i = Σ_j S_ij softmax(W_r x_j), S = causal row-softmax(X W_s Xᵀ/τ), also
  as an attention pass (q = X W_s, k = X, scale 1/τ). With ``heads`` > 1 the D features are split into
  heads and S is the mean of the per-head row-softmaxes (one head is the formula above); the head axis
  is what Ulysses scatters, so similarity routing runs under ring, Ulysses and hybrid alike.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from longreach.attention import AttentionContext, LocalAttention

__all__ = [
    "at_least_f32",
    "top_k_gates",
    "balance_loss",
    "z_loss",
    "RoutingTap",
    "attention_mix",
    "similarity_mix",
    "explicit_attention_matrix",
]

InnerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext], torch.Tensor]


def at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it already is (routing numerics never run in half precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def top_k_gates(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k choices of a router distribution, renormalised over the chosen.

    Args:
        probs: ``[N, E]`` router probabilities (rows sum to 1).
        k: choices per token.

    Returns:
        ``(gates [N, k], experts [N, k] int64)``; gates sum to 1 per token.
    """
    top_p, top_i = probs.topk(k, dim=-1)  # [N, k]
    return top_p / top_p.sum(-1, keepdim=True).clamp_min(torch.finfo(top_p.dtype).tiny), top_i


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Load-balancing loss E·Σ fᵢPᵢ.

    Args:
        probs: ``[N, E]`` router probabilities.
        chosen: ``[N, k]`` chosen expert ids (before any capacity drop).

    Returns:
        Scalar: ``E · Σ_i f_i P_i`` with ``f_i`` = fraction of tokens choosing i (no gradient) and
        ``P_i`` = mean probability of i; equals k under perfect balance.
    """
    n, e = probs.shape
    if n == 0:
        return probs.sum() * 0.0
    f = torch.bincount(chosen.reshape(-1), minlength=e).to(probs.dtype) / n  # [E], sums to k
    return e * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)². ``logits`` ``[N, E]``."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(at_least_f32(logits), dim=-1).pow(2).mean()


class RoutingTap:
    """What the attention layer of a block leaves for the FFN's attention-aware routing.

    The attention layer calls :meth:`record` with its (post-RoPE) q, k, the context and the inner
    attention it used; the FFN reads them in the same forward. Nothing is kept across forwards
    (:meth:`clear` after use), so no activations leak.
    """

    __slots__ = ("q", "k", "ctx", "inner")

    def __init__(self) -> None:
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.ctx: AttentionContext | None = None
        self.inner: InnerFn | None = None

    def record(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext | None, inner: InnerFn | None) -> None:
        self.q, self.k, self.ctx, self.inner = q, k, ctx, inner

    def clear(self) -> None:
        self.q = self.k = self.ctx = self.inner = None

    @property
    def ready(self) -> bool:
        return self.q is not None


def _values_pass(
    q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, *, inner: InnerFn | None, ctx: AttentionContext | None,
) -> torch.Tensor:
    """``attention(q, k, V)`` with V ``[B, S, E]`` shared by every key head; returns ``[B, S, H, E]``.

    Backends want v's head size to equal q's on some paths, so V is zero-padded (or split) to D
    columns; zero columns give zero outputs and are dropped.
    """
    b, s, hkv, d = k.shape
    e = values.shape[-1]
    inner = inner if inner is not None else LocalAttention("auto")
    ctx = ctx if ctx is not None else AttentionContext()
    outs = []
    for start in range(0, e, d):
        part = values[..., start:start + d].to(q.dtype)  # [B, S, <=D]
        width = part.shape[-1]
        if width < d:
            part = F.pad(part, (0, d - width))
        v = part[:, :, None, :].expand(b, s, hkv, d).contiguous()  # [B, S, Hkv, D]
        outs.append(inner(q, k, v, ctx)[..., :width])  # [B, S, H, width]
    return torch.cat(outs, dim=-1)  # [B, S, H, E]


def attention_mix(
    probs: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *, inner: InnerFn | None = None,
    ctx: AttentionContext | None = None,
) -> torch.Tensor:
    """A·P for the head-averaged causal attention matrix A of (q, k), without forming A.

    Args:
        probs: ``[B, S, E]`` router probabilities of the local tokens.
        q: ``[B, S, H, D]``, k: ``[B, S, Hkv, D]`` — the preceding attention layer's (post-RoPE) inputs.
        inner: that layer's inner attention (causal, context-parallel if the model is); None → local
            causal attention.
        ctx: the attention context it was called with (scale, positions, global length).

    Returns:
        ``[B, S, E]`` float32 mixed probabilities (rows still sum to 1).
    """
    out = _values_pass(q, k, probs, inner=inner, ctx=ctx)  # [B, S, H, E]
    return at_least_f32(out).mean(dim=2)


def similarity_mix(
    probs: torch.Tensor, x: torch.Tensor, x_proj: torch.Tensor, *, tau: float, heads: int = 1,
    inner: InnerFn | None = None, ctx: AttentionContext | None = None,
) -> torch.Tensor:
    """P_i = Σ_j S_ij P_j with S = mean over heads of causal row-softmax((X W_s)_h X_hᵀ / τ), one attention pass.

    Args:
        probs: ``[B, S, E]``; x: ``[B, S, D]`` the FFN input; x_proj: ``[B, S, D]`` = x W_s.
        tau: temperature τ.
        heads: similarity heads (divides D); head h uses features ``h·D/heads … (h+1)·D/heads − 1``.
        inner, ctx: the causal (possibly context-parallel) inner attention and its context.

    Returns:
        ``[B, S, E]`` float32.
    """
    base = ctx if ctx is not None else AttentionContext()
    sctx = AttentionContext(layer=base.layer, step=base.step, seq_len=base.seq_len, positions=base.positions,
                            cu_seqlens=base.cu_seqlens, training=base.training, scale=1.0 / tau)
    b, s, d = x.shape
    qh = x_proj.reshape(b, s, heads, d // heads)  # [B, S, Hs, D/Hs]
    kh = x.reshape(b, s, heads, d // heads)  # [B, S, Hs, D/Hs]
    out = _values_pass(qh, kh, probs, inner=inner, ctx=sctx)  # [B, S, Hs, E]
    return at_least_f32(out).mean(dim=2)


def explicit_attention_matrix(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """The head-averaged causal attention matrix ``[B, S, S]`` (tests only: it is S² memory)."""
    b, s, h, d = q.shape
    kk = k.repeat_interleave(h // k.shape[2], dim=2)  # [B, S, H, D]
    sc = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) * (scale if scale is not None else d ** -0.5)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    sc = sc.masked_fill(~causal, float("-inf"))
    return sc.softmax(-1).mean(1)  # [B, S, S]
