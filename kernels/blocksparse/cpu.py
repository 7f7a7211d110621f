"""``cpu_sparse``: block-sparse attention on CPU, built on the CPU flash kernel (:mod:`..dense.cpu`).

The query × key space is cut into tiles (``TILE_Q`` × ``TILE_K``). For each query tile the mask's tile
classes pick the key tiles to compute: FULL tiles go to the flash kernel in one call without a mask,
PARTIAL tiles in a second call with the elementwise pattern, EMPTY tiles are never touched; the two
partial results are combined with :func:`~longreach.kernels.merge.merge_attention`. Heads whose tile
classes differ (S2, SSA) are processed in groups. The backward pass reuses the same selection with the
*global* out/lse, so it is exact for context parallelism too.

Same contract as :mod:`longreach.kernels.dense.reference`: q ``[B, Sq, H, D]``, k ``[B, Sk, Hkv, D]``,
v ``[B, Sk, Hkv, E]``; out ``[B, Sq, H, E]``; lse ``[B, H, Sq]`` float32 (float64 for float64 input),
rows with no allowed key out = 0, lse = −inf.
"""
from __future__ import annotations

import math

import torch

from ..dense import cpu as dense_cpu
from ..dense.reference import check_shapes
from ..masks import FULL, PARTIAL, Mask, PlacedMask, place
from ..merge import merge_attention
from ._plan import build_plan, head_groups

__all__ = ["forward", "backward", "TILE_Q", "TILE_K"]

#: Query / key tile sizes (tokens). 128 amortises the flash kernel's per-call cost on CPU.
TILE_Q = 128
TILE_K = 128


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _token_index(tiles: torch.Tensor, tile: int, n: int) -> slice | torch.Tensor:
    """Token indices of a sorted list of tiles: a slice when contiguous (no copy), else a LongTensor."""
    t = tiles.tolist()
    if t[-1] - t[0] + 1 == len(t):
        return slice(t[0] * tile, min(n, (t[-1] + 1) * tile))
    return torch.cat([torch.arange(i * tile, min(n, (i + 1) * tile)) for i in t])


def _sub_placed(placed: PlacedMask, head_idx: torch.Tensor | None, heads: int) -> PlacedMask:
    if head_idx is None:
        return placed
    gheads, nh = placed._heads(heads)
    return PlacedMask(placed.mask, placed.q_pos, placed.k_pos, placed.seq_len, gheads[head_idx], nh)


def _groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, placed: PlacedMask):
    """Yield (query head index or None, kv head index or None, sub-mask, tile kinds [nQ, nK], k_g, v_g)."""
    b, sq, h, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    plan = build_plan(placed, sq, sk, h, TILE_Q, TILE_K, with_partial=False)
    for head_idx, kind in head_groups(plan.kind, h):
        if head_idx is None:
            yield None, None, placed, kind, k, v
        else:
            kv_idx = head_idx // (h // hkv)  # local expansion of K/V for this head group only
            yield head_idx, kv_idx, _sub_placed(placed, head_idx, h), kind, k[:, :, kv_idx], v[:, :, kv_idx]


def _row_parts(row: torch.Tensor, sk: int):
    """For one query tile's kinds ``[nK]``: (token index, use mask) for its FULL and PARTIAL key tiles."""
    for cls, use_mask in ((FULL, False), (PARTIAL, True)):
        tiles = (row == cls).nonzero().reshape(-1)
        if tiles.numel():
            yield _token_index(tiles, TILE_K, sk), use_mask


def _pad_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The aten CPU flash kernel wants one head size: zero-pad q/k or v to max(D, E) (scores unchanged)."""
    d, e = q.shape[-1], v.shape[-1]
    if d == e:
        return q, k, v
    f = max(d, e)
    pad = lambda x: torch.nn.functional.pad(x, (0, f - x.shape[-1]))  # noqa: E731
    return pad(q), pad(k), pad(v)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Mask | PlacedMask | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward. Returns out ``[B, Sq, H, E]`` (q dtype) and lse ``[B, H, Sq]``."""
    check_shapes(q, k, v)
    b, sq, h, d = q.shape
    sk, e = k.shape[1], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    placed = place(mask, sq, sk, num_heads=h)
    if e != d:
        out, lse = forward(*_pad_heads(q, k, v), mask=placed, scale=scale)
        return out[..., :e].contiguous(), lse
    if placed is None or sq == 0 or sk == 0:
        return dense_cpu.forward(q, k, v, mask=placed, scale=scale)
    acc = _acc_dtype(q)
    out = torch.zeros(b, sq, h, e, dtype=acc)  # [B, Sq, H, E]
    lse = torch.full((b, h, sq), float("-inf"), dtype=acc)  # [B, H, Sq]
    for head_idx, _, sub, kind, kg, vg in _groups(q, k, v, placed):
        qg = q if head_idx is None else q[:, :, head_idx]  # [B, Sq, Hg, D]
        for i in range(kind.shape[0]):
            qs = slice(i * TILE_Q, min(sq, (i + 1) * TILE_Q))
            o = l = None
            for kidx, use_mask in _row_parts(kind[i], sk):
                m = sub.slice(qs, kidx) if use_mask else None
                bo, bl = dense_cpu.forward(qg[:, qs], kg[:, kidx], vg[:, kidx], mask=m, scale=scale)
                o, l = merge_attention(o, l, bo, bl)
            if o is None:
                continue  # no allowed key for this query tile: out 0, lse -inf
            if head_idx is None:
                out[:, qs], lse[:, :, qs] = o, l
            else:
                out[:, qs, head_idx], lse[:, head_idx, qs] = o.to(acc), l.to(acc)
    return out.to(q.dtype), lse


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, mask: Mask | PlacedMask | None = None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the block given the *global* out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]`` of its rows."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    placed = place(mask, sq, sk, num_heads=h)
    if v.shape[-1] != d:
        e, f = v.shape[-1], max(d, v.shape[-1])
        pad = lambda x: torch.nn.functional.pad(x, (0, f - x.shape[-1]))  # noqa: E731
        gq, gk, gv = backward(pad(dout), *_pad_heads(q, k, v), pad(out), lse, mask=placed, scale=scale)
        return gq[..., :d].contiguous(), gk[..., :d].contiguous(), gv[..., :e].contiguous()
    if placed is None or sq == 0 or sk == 0:
        return dense_cpu.backward(dout, q, k, v, out, lse, mask=placed, scale=scale)
    acc = _acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc)  # [B, Sq, H, D]
    dk = torch.zeros(k.shape, dtype=acc)  # [B, Sk, Hkv, D]
    dv = torch.zeros(v.shape, dtype=acc)  # [B, Sk, Hkv, E]
    for head_idx, kv_idx, sub, kind, kg, vg in _groups(q, k, v, placed):
        if head_idx is None:
            qg, dog, og, lg = q, dout, out, lse
            dkg, dvg = dk, dv
        else:
            qg, dog, og, lg = q[:, :, head_idx], dout[:, :, head_idx], out[:, :, head_idx], lse[:, head_idx]
            dkg = torch.zeros(b, sk, head_idx.numel(), d, dtype=acc)  # per query head, reduced below
            dvg = torch.zeros(b, sk, head_idx.numel(), v.shape[-1], dtype=acc)
        dqg = torch.zeros(qg.shape, dtype=acc)
        for i in range(kind.shape[0]):
            qs = slice(i * TILE_Q, min(sq, (i + 1) * TILE_Q))
            for kidx, use_mask in _row_parts(kind[i], sk):
                m = sub.slice(qs, kidx) if use_mask else None
                gq, gk, gv = dense_cpu.backward(
                    dog[:, qs], qg[:, qs], kg[:, kidx], vg[:, kidx], og[:, qs], lg[:, :, qs], mask=m, scale=scale
                )
                dqg[:, qs] += gq
                if isinstance(kidx, slice):
                    dkg[:, kidx] += gk
                    dvg[:, kidx] += gv
                else:
                    dkg.index_add_(1, kidx, gk.to(acc))
                    dvg.index_add_(1, kidx, gv.to(acc))
        if head_idx is None:
            dq = dqg
        else:
            dq[:, :, head_idx] = dqg
            dk.index_add_(2, kv_idx, dkg)
            dv.index_add_(2, kv_idx, dvg)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
