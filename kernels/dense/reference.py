"""Reference softmax attention: materialised scores, float64-capable. The oracle for every fast path.

Shapes: q ``[B, Sq, H, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, E]``, H a multiple of Hkv;
out ``[B, Sq, H, E]``; lse ``[B, H, Sq]`` (float32, float64 for float64 inputs). Rows with no
allowed key give out = 0 and lse = −inf.

Every backend's ``backward`` also takes ``grad_dtype`` (default None: gradients in the input dtypes).
A caller that sums the gradients of several calls (context parallelism) asks for float32 partials of
bf16 inputs, computed and returned without rounding to bf16, and rounds once after the sum.
"""
from __future__ import annotations

import math

import torch

from ..masks import Mask, PlacedMask, place


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def grad_compute_dtype(dtype: torch.dtype, grad_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a kernel runs in for inputs of ``dtype`` when ``grad_dtype`` gradients are asked for: the
    wider of the two (bf16 inputs, float32 gradients: float32, exact for every bf16 value)."""
    return dtype if grad_dtype is None else torch.promote_types(dtype, grad_dtype)


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    # local expansion for computing only; never done before communication
    rep = heads // x.shape[2]
    return x if rep == 1 else x.repeat_interleave(rep, dim=2)


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, S, H, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes disagree: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def _scores_mask(mask: Mask | PlacedMask | None, sq: int, sk: int, heads: int) -> torch.Tensor | None:
    placed = place(mask, sq, sk, num_heads=heads)
    if placed is None:
        return None
    return placed.dense(heads)  # [Hm, Sq, Sk]


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Mask | PlacedMask | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_shapes(q, k, v)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cd = _compute_dtype(q)
    qf = q.to(cd).transpose(1, 2)  # [B, H, Sq, D]
    kf = _expand_kv(k.to(cd), h).transpose(1, 2)  # [B, H, Sk, D]
    vf = _expand_kv(v.to(cd), h).transpose(1, 2)  # [B, H, Sk, E]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    allowed = _scores_mask(mask, sq, sk, h)
    if allowed is not None:
        s = s.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Sq]; -inf for empty rows
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe[..., None])
    out = torch.matmul(p, vf).transpose(1, 2)  # [B, Sq, H, E]
    return out.to(q.dtype), lse.to(cd)


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, mask: Mask | PlacedMask | None = None, scale: float | None = None, grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *global* out and lse of its query rows.

    Returns dq ``[B, Sq, H, D]``, dk ``[B, Sk, Hkv, D]``, dv ``[B, Sk, Hkv, E]`` in ``grad_dtype``
    (None: the dtypes of q, k, v); computed in float32 (float64 for float64 inputs or gradients).
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cd = grad_compute_dtype(_compute_dtype(q), grad_dtype)
    qf = q.to(cd).transpose(1, 2)
    kf = _expand_kv(k.to(cd), h).transpose(1, 2)
    vf = _expand_kv(v.to(cd), h).transpose(1, 2)
    do = dout.to(cd).transpose(1, 2)  # [B, H, Sq, E]
    o = out.to(cd).transpose(1, 2)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    allowed = _scores_mask(mask, sq, sk, h)
    if allowed is not None:
        s = s.masked_fill(~allowed[None], float("-inf"))
    lse_c = lse.to(cd)
    lse_c = torch.where(torch.isneginf(lse_c), torch.zeros_like(lse_c), lse_c)
    p = torch.exp(s - lse_c[..., None])  # [B, H, Sq, Sk]
    dv = torch.matmul(p.transpose(-1, -2), do)  # [B, H, Sk, E]
    dp = torch.matmul(do, vf.transpose(-1, -2))
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kf) * scale  # [B, H, Sq, D]
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale  # [B, H, Sk, D]
    rep = h // hkv
    if rep > 1:
        dk = dk.view(b, hkv, rep, sk, d).sum(2)
        dv = dv.view(b, hkv, rep, sk, dv.shape[-1]).sum(2)
    return (
        dq.transpose(1, 2).to(grad_dtype or q.dtype),
        dk.transpose(1, 2).to(grad_dtype or k.dtype),
        dv.transpose(1, 2).to(grad_dtype or v.dtype),
    )
