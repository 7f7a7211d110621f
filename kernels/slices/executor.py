"""Run a slice plan on a device's dense kernel: one batched call per bucket, results merged by LSE.

A *runner* wraps one device kernel in ``[N, H, S, D]`` layout (units stacked in N):

    forward(q, k, v, *, causal, mask, scale) -> (out [N, Hg, m, E], lse [N, Hg, m] float32)
    backward(dout, q, k, v, out, lse, *, causal, mask, scale) -> (dq, dk, dv)

with q ``[N, Hg, m, D]``, k/v ``[N, Hk, n, D|E]`` (Hk divides Hg, GQA inside the call), ``causal`` square and
diagonal-aligned, ``mask`` None or ``bool [N, Hd, m, n]`` (rows it leaves empty must come back as out = 0,
lse = −inf). ``backward`` receives the *global* out and lse of its rows (finite: rows empty everywhere have
no unit), so every unit's gradients are exact for the whole attention, as context parallelism needs.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..masks import PlacedMask
from ..merge import merge_attention
from .plan import CAUSAL_KIND, get_plan

__all__ = ["Runner", "forward", "backward"]


class Runner(Protocol):
    def forward(self, q, k, v, *, causal: bool, mask: torch.Tensor | None, scale: float): ...

    def backward(self, dout, q, k, v, out, lse, *, causal: bool, mask: torch.Tensor | None, scale: float): ...


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gather(xt: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """``xt [S, H, B, D]`` → units ``[U·B, Hg, m, D]`` (rows ``[U, m]``, heads ``[U, Hg]``)."""
    g = xt[rows[:, :, None], heads[:, None, :]]  # [U, m, Hg, B, D]
    u, m, hg, b, d = g.shape
    return g.permute(0, 3, 2, 1, 4).reshape(u * b, hg, m, d)


def _scatter_view(x: torch.Tensor, u: int) -> torch.Tensor:
    """Unit results ``[U·B, Hg, m, *]`` → ``[U, m, Hg, B, *]`` (the index order of the accumulators)."""
    b = x.shape[0] // u
    x = x.view(u, b, *x.shape[1:])
    return x.permute(0, 3, 2, 1, 4) if x.dim() == 5 else x.permute(0, 3, 2, 1)


def _unit_mask(mask: torch.Tensor | None, b: int) -> torch.Tensor | None:
    if mask is None:
        return None
    u = mask.shape[0]
    return mask[:, None].expand(u, b, *mask.shape[1:]).reshape(u * b, *mask.shape[1:])  # [U·B, Hd, m, n]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, placed: PlacedMask, scale: float,
            runner: Runner, *, tiles: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, Sq, H, D]`` over ``k/v [B, Sk, Hkv, D|E]`` under ``placed``.

    Returns out ``[B, Sq, H, E]`` (q dtype) and lse ``[B, H, Sq]`` float32 (float64 for float64 inputs).
    ``tiles`` runs the tile plan instead of the mask's analytic slices.
    """
    b, sq, h, _ = q.shape
    sk, hkv, e = k.shape[1], k.shape[2], v.shape[-1]
    acc = _acc_dtype(q)
    plan = get_plan(placed, sq, sk, h, hkv, tiles=tiles)
    out = torch.zeros(sq, h, b, e, dtype=acc, device=q.device)  # [Sq, H, B, E]
    lse = torch.full((sq, h, b), float("-inf"), dtype=acc, device=q.device)  # [Sq, H, B]
    qt, kt, vt = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [S, H, B, D] views
    for bucket in plan.buckets:
        causal = bucket.kind == CAUSAL_KIND
        if bucket.identity:
            o, l = runner.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, mask=None,
                                  scale=scale)  # [B, H, Sq, E], [B, H, Sq]
            return o.transpose(1, 2).to(q.dtype).contiguous(), l.to(acc).contiguous()
        rows, heads, keys, kv_heads, mask = bucket.on(q.device)
        u = rows.shape[0]
        o, l = runner.forward(_gather(qt, rows, heads), _gather(kt, keys, kv_heads), _gather(vt, keys, kv_heads),
                              causal=causal, mask=_unit_mask(mask, b), scale=scale)
        o, l = _scatter_view(o, u).to(acc), _scatter_view(l, u).to(acc)  # [U, m, Hg, B, E], [U, m, Hg, B]
        idx = (rows[:, :, None], heads[:, None, :])
        if not bucket.first:
            e_ = o.shape[-1]
            mo, ml = merge_attention(out[idx].reshape(1, -1, 1, e_), lse[idx].reshape(1, 1, -1),
                                     o.reshape(1, -1, 1, e_), l.reshape(1, 1, -1))
            o, l = mo.view(o.shape), ml.view(l.shape)
        out[idx] = o
        lse[idx] = l
    return out.permute(2, 0, 1, 3).to(q.dtype).contiguous(), lse.permute(2, 1, 0).contiguous()


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, placed: PlacedMask, scale: float, runner: Runner, *, tiles: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients given the *global* out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]`` of the query rows."""
    b, sq, h, d = q.shape
    sk, hkv, e = k.shape[1], k.shape[2], v.shape[-1]
    acc = _acc_dtype(q)
    plan = get_plan(placed, sq, sk, h, hkv, tiles=tiles)
    # rows with no allowed key anywhere belong to no full/causal unit; a finite lse keeps masked tiles finite
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).to(acc)
    dout, out = dout.to(q.dtype), out.to(q.dtype)
    dq = torch.zeros(sq, h, b, d, dtype=acc, device=q.device)  # [Sq, H, B, D]
    dk = torch.zeros(sk, hkv, b, d, dtype=acc, device=q.device)  # [Sk, Hkv, B, D]
    dv = torch.zeros(sk, hkv, b, e, dtype=acc, device=q.device)  # [Sk, Hkv, B, E]
    qt, kt, vt, dot, ot = (x.permute(1, 2, 0, 3) for x in (q, k, v, dout, out))
    lt = lse.permute(2, 1, 0)  # [Sq, H, B]
    for bucket in plan.buckets:
        causal = bucket.kind == CAUSAL_KIND
        if bucket.identity:
            gq, gk, gv = runner.backward(dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         out.transpose(1, 2), lse.contiguous(), causal=causal, mask=None, scale=scale)
            return (gq.transpose(1, 2).to(q.dtype).contiguous(), gk.transpose(1, 2).to(k.dtype).contiguous(),
                    gv.transpose(1, 2).to(v.dtype).contiguous())
        rows, heads, keys, kv_heads, mask = bucket.on(q.device)
        u = rows.shape[0]
        lg = lt[rows[:, :, None], heads[:, None, :]]  # [U, m, Hg, B]
        lg = lg.permute(0, 3, 2, 1).reshape(-1, lg.shape[2], lg.shape[1])  # [U·B, Hg, m]
        gq, gk, gv = runner.backward(
            _gather(dot, rows, heads), _gather(qt, rows, heads), _gather(kt, keys, kv_heads), _gather(vt, keys, kv_heads),
            _gather(ot, rows, heads), lg.contiguous(), causal=causal, mask=_unit_mask(mask, b), scale=scale,
        )
        dq.index_put_((rows[:, :, None], heads[:, None, :]), _scatter_view(gq, u).to(acc), accumulate=True)
        kidx = (keys[:, :, None], kv_heads[:, None, :])
        dk.index_put_(kidx, _scatter_view(gk, u).to(acc), accumulate=True)
        dv.index_put_(kidx, _scatter_view(gv, u).to(acc), accumulate=True)
    return (dq.permute(2, 0, 1, 3).to(q.dtype).contiguous(), dk.permute(2, 0, 1, 3).to(k.dtype).contiguous(),
            dv.permute(2, 0, 1, 3).to(v.dtype).contiguous())
