"""Attention for routed (token, head) pairs only: MoH's routed heads without computing masked-out heads.

Each routed head h gets the queries of the tokens routed to it, ``q[b, tokens_h, h]`` (sorted by global
position), and runs them against the *full* keys of its key/value head under the layer's own mask
(causal or documents, intersected with its pattern), placed at the queries' global positions. The work is
``Σ_h n_h × S`` pairs (halved by causality) instead of ``R × S × S``: for k of R routed heads active per
token it is k/R of the routed heads' dense cost.

Context parallelism. The queries stay where they are; the keys are distributed in the cp ``layout`` over
the cp group. Whatever strategy the layer's shared heads use (ring, Ulysses, hybrid, all-gather), the
routed heads gather the K/V of their key/value heads from the cp group (all-gather, K/V heads only), put
them in global order, and run the gathered queries of every routed head against them; backward gathers
K/V again (nothing P-times larger is kept between the passes) and reduce-scatters dK/dV to their owners.
Per-rank compute is (routed queries on this rank) × S, as under the all-gather strategy; the K/V buffer
of one pass is ``S × H_kv`` rows (never S × S). Ulysses-style head scattering would not help here: the
routed query sets differ per head and per rank.

Exactness: every (token, head) output equals the dense layer's, and inactive pairs are exactly zero, so
``out * gates`` matches the masked formulation in forward and in every gradient (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from longreach.attention import AttentionContext, ContextParallelAttention, LocalAttention, base_mask
from longreach.kernels import get_backend
from longreach.kernels.masks import Mask
from longreach.kernels import merge_attention
from longreach.kernels.api import resolve_backend
from longreach.parallel.comm import all_gather_into, reduce_scatter_into
from longreach.parallel.layouts import positions_for

__all__ = ["WINDOW", "Job", "RoutedSegments", "plan_jobs", "routed_attention", "supports_routed"]


def supports_routed(inner: Any) -> bool:
    """Whether ``inner`` exposes what routed-only execution needs (backend, pattern, cp group/layout)."""
    return isinstance(inner, LocalAttention)


def _cp(inner: LocalAttention) -> tuple[dist.ProcessGroup | None, str, int, int]:
    """(group, layout, rank, size) of a context-parallel inner attention; size 1 for local attention."""
    if not isinstance(inner, ContextParallelAttention) or not dist.is_initialized():
        return None, "contiguous", 0, 1
    group = inner.group
    return group, inner.layout, dist.get_rank(group), dist.get_world_size(group)


def _backend(name: str, q: torch.Tensor, mask: Any) -> ModuleType:
    """The local backend of one call: the layer's, or for ``auto`` the kernels' own choice for this mask."""
    return get_backend(resolve_backend(name, q, mask))


#: Positions per causal window: the routed queries of a window run the keys before it in one unmasked call
#: and the window's own keys in one small masked call; the masked call computes about twice the pairs it
#: needs, so the work beyond the exact causal count is about WINDOW / S of it.
WINDOW = 256


@dataclass(kw_only=True, slots=True)
class Job:
    """One kernel call: packed query rows ``rows`` of one segment against gathered keys ``keys``."""

    seg: int
    rows: slice
    keys: slice
    mask: Any
    """A PlacedMask, or None (every key allowed)."""
    backend: ModuleType


@dataclass(kw_only=True, slots=True)
class RoutedSegments:
    """The packed queries of every (batch row, routed head): segment i is rows ``starts[i]:starts[i+1]``."""

    rows: list[int]
    """Batch row of each segment."""
    kv_heads: list[int]
    """Key/value head of each segment."""
    starts: list[int]
    """Offsets into the packed rows (length segments + 1)."""
    jobs: list[Job]
    """The kernel calls, grouped by segment (a segment's calls cover disjoint key ranges)."""
    scale: float


def plan_jobs(seg_rows: list[int], starts: list[int], q_pos: list[torch.Tensor], heads: list[int],
              masks: list[Mask], *, k_pos: torch.Tensor, seq_len: int, num_heads: int, causal_fast: bool,
              backend: str, probe: torch.Tensor) -> list[Job]:
    """Kernel calls of every segment.

    With ``causal_fast`` (plain causal mask, keys in global order 0..S-1, queries sorted) the queries of each
    window of :data:`WINDOW` positions, at positions ``lo … hi``, run keys ``[0, lo)`` with no mask (the
    fastest dense call) and keys ``[lo, hi]`` with the causal pattern placed at their positions. Otherwise
    one call per segment against every key with the layer's mask placed at the queries' positions.
    """
    jobs: list[Job] = []
    for i in range(len(seg_rows)):
        lo_row, hi_row = starts[i], starts[i + 1]
        if hi_row == lo_row:
            continue
        head = torch.tensor([heads[i]])
        if not causal_fast:
            placed = masks[i].place(q_pos[i], k_pos, seq_len=seq_len, heads=head, num_heads=num_heads)
            jobs.append(Job(seg=i, rows=slice(lo_row, hi_row), keys=slice(0, k_pos.numel()), mask=placed,
                            backend=_backend(backend, probe, placed)))
            continue
        window = q_pos[i] // WINDOW  # [n] sorted
        cuts = (torch.nonzero(window[1:] != window[:-1]).view(-1) + 1).tolist()
        for a, b in zip([lo_row] + [lo_row + c for c in cuts], [lo_row + c for c in cuts] + [hi_row]):
            pos = q_pos[i][a - lo_row:b - lo_row]
            first, last = int(pos[0]), int(pos[-1])
            if first > 0:
                jobs.append(Job(seg=i, rows=slice(a, b), keys=slice(0, first), mask=None,
                                backend=_backend(backend, probe, None)))
            placed = masks[i].place(pos, k_pos[first:last + 1], seq_len=seq_len, heads=head, num_heads=num_heads)
            jobs.append(Job(seg=i, rows=slice(a, b), keys=slice(first, last + 1), mask=placed,
                            backend=_backend(backend, probe, placed)))
    return jobs


class _GatheredKV:
    """All-gather of K/V over the cp group into global order, and the inverse reduce-scatter."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, layout: str, seq_len: int) -> None:
        self.group, self.size = group, size
        if size > 1:
            gathered = torch.cat([positions_for(seq_len, layout, r, size) for r in range(size)])  # rank-major
            self.order = torch.argsort(gathered)  # rank-major index of each global position
        else:
            self.order = None

    def gather(self, kv: torch.Tensor) -> torch.Tensor:
        """``[B, S/P, Hkv, W]`` → ``[B, S, Hkv, W]`` in global position order."""
        if self.size == 1:
            return kv
        local = kv.transpose(0, 1).contiguous()  # [S/P, B, Hkv, W]
        buf = local.new_empty((self.size * local.shape[0],) + tuple(local.shape[1:]))  # [S, B, Hkv, W] rank-major
        all_gather_into(buf, local, group=self.group)
        return buf[self.order.to(buf.device)].transpose(0, 1)  # [B, S, Hkv, W]

    def scatter(self, grad: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`gather` for gradients: ``[B, S, Hkv, W]`` → this rank's summed ``[B, S/P, Hkv, W]``."""
        if self.size == 1:
            return grad
        rank_major = torch.empty_like(grad.transpose(0, 1))  # [S, B, Hkv, W]
        rank_major[self.order.to(grad.device)] = grad.transpose(0, 1)
        out = rank_major.new_empty((rank_major.shape[0] // self.size,) + tuple(rank_major.shape[1:]))
        reduce_scatter_into(out, rank_major.contiguous(), group=self.group)
        return out.transpose(0, 1)


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_packed, k, v, seg: RoutedSegments, kv: _GatheredKV):  # type: ignore[override]
        d = k.shape[-1]
        full = kv.gather(torch.cat([k, v], dim=-1))  # [B, S, Hkv, D+E]
        acc = torch.float64 if q_packed.dtype == torch.float64 else torch.float32
        out = q_packed.new_zeros(q_packed.shape[0], v.shape[-1], dtype=acc)  # [N, E]
        lse = torch.full((q_packed.shape[0],), float("-inf"), dtype=acc, device=q_packed.device)  # [N]
        running: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # rows start -> merged (out, lse)
        for job in seg.jobs:
            b, g, n = seg.rows[job.seg], seg.kv_heads[job.seg], job.rows.stop - job.rows.start
            kb = full[b:b + 1, job.keys, g:g + 1]  # [1, Sk, 1, D+E]
            o, l = job.backend.forward(q_packed[job.rows].view(1, n, 1, d), kb[..., :d], kb[..., d:],
                                       mask=job.mask, scale=seg.scale)  # [1, n, 1, E], [1, 1, n]
            prev = running.get(job.rows.start)
            running[job.rows.start] = (job.rows.stop, *merge_attention(
                None if prev is None else prev[1], None if prev is None else prev[2], o.to(acc), l.to(acc)))
        for start, (stop, o, l) in running.items():
            out[start:stop] = o.view(stop - start, -1)
            lse[start:stop] = l.view(-1)
        out = out.to(q_packed.dtype)
        ctx.save_for_backward(q_packed, k, v, out, lse)
        ctx.seg, ctx.kv = seg, kv
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q_packed, k, v, out, lse = ctx.saved_tensors
        seg = ctx.seg
        d = k.shape[-1]
        full = ctx.kv.gather(torch.cat([k, v], dim=-1))  # [B, S, Hkv, D+E] (gathered again, not kept)
        dfull = torch.zeros_like(full)  # [B, S, Hkv, D+E]
        dq = torch.zeros_like(q_packed)  # [N, D]
        for job in seg.jobs:
            b, g, n = seg.rows[job.seg], seg.kv_heads[job.seg], job.rows.stop - job.rows.start
            kb = full[b:b + 1, job.keys, g:g + 1]  # [1, Sk, 1, D+E]
            gq, gk, gv = job.backend.backward(dout[job.rows].reshape(1, n, 1, -1), q_packed[job.rows].view(1, n, 1, d),
                                              kb[..., :d], kb[..., d:], out[job.rows].view(1, n, 1, -1),
                                              lse[job.rows].view(1, 1, n), mask=job.mask, scale=seg.scale)
            dq[job.rows] += gq.reshape(n, d).to(dq.dtype)
            dfull[b, job.keys, g, :d] += gk[0, :, 0].to(dfull.dtype)
            dfull[b, job.keys, g, d:] += gv[0, :, 0].to(dfull.dtype)
        dkv = ctx.kv.scatter(dfull)  # [B, S/P, Hkv, D+E]
        return dq, dkv[..., :d], dkv[..., d:], None, None


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, active: torch.Tensor, *, first_head: int,
                     num_heads: int, inner: LocalAttention, ctx: AttentionContext) -> torch.Tensor:
    """Attention of the active (token, head) pairs of ``q`` against all keys; inactive pairs are 0.

    Args:
        q: ``[B, S, R, D]`` (post-RoPE) queries of R consecutive query heads starting at global head
            ``first_head``; ``num_heads`` is the layer's query head count H (GQA: head h reads key/value
            head ``h // (H / Hkv)``).
        k: ``[B, S, Hkv, D]``, v: ``[B, S, Hkv, E]`` — all key/value heads of the layer (local tokens).
        active: ``[B, S, R]`` bool, the pairs to compute.
        inner: the layer's inner attention (its backend and pattern apply; a
            :class:`~longreach.attention.ContextParallelAttention` gives the cp group and layout).
        ctx: the attention context of the call (scale, positions, documents, step, layer).

    Returns:
        ``[B, S, R, E]``: each active pair's attention output, exact zeros elsewhere.
    """
    b, s, r, d = q.shape
    hkv = k.shape[2]
    group, layout, rank, size = _cp(inner)
    seq_len = ctx.seq_len if ctx.seq_len is not None else s * size
    if size > 1:
        pos = positions_for(seq_len, layout, rank, size)  # [S] global positions of the local tokens
        k_pos = torch.arange(seq_len)
    else:
        pos = ctx.positions.cpu() if ctx.positions is not None else torch.arange(s)
        k_pos = pos
    per_row = isinstance(ctx.cu_seqlens, (tuple, list))
    extra = inner.extra_mask(ctx)
    row_masks = [base_mask(replace(ctx, cu_seqlens=ctx.cu_seqlens[i]) if per_row else ctx, extra) for i in range(b)]
    # plain causal attention over keys in global order: split each query chunk into an unmasked call and
    # a small masked one (see plan_jobs); any other pattern is placed as it is
    causal_fast = (extra is None and ctx.cu_seqlens is None
                   and bool(torch.equal(k_pos, torch.arange(k_pos.numel()))))
    group_size = num_heads // hkv
    order = torch.argsort(pos)  # local token indices in global position order
    act = active[:, order.to(active.device)].cpu()  # [B, S, R] in position order
    rows, heads, kv_heads, starts, q_pos, masks, b_idx, s_idx, r_idx = [], [], [], [0], [], [], [], [], []
    for i in range(b):
        for j in range(r):
            tok = order[act[i, :, j]]  # [n] local indices, increasing global position
            rows.append(i)
            heads.append(first_head + j)
            kv_heads.append((first_head + j) // group_size)
            starts.append(starts[-1] + tok.numel())
            q_pos.append(pos[tok])
            masks.append(row_masks[i])
            b_idx.append(torch.full_like(tok, i))
            s_idx.append(tok)
            r_idx.append(torch.full_like(tok, j))
    jobs = plan_jobs(rows, starts, q_pos, heads, masks, k_pos=k_pos, seq_len=seq_len, num_heads=num_heads,
                     causal_fast=causal_fast, backend=inner.backend, probe=q)
    seg = RoutedSegments(rows=rows, kv_heads=kv_heads, starts=starts, jobs=jobs,
                         scale=ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(d))
    index = tuple(torch.cat(t).to(q.device) for t in (b_idx, s_idx, r_idx))  # each [N]
    q_packed = q[index]  # [N, D]
    kv = _GatheredKV(group, size, layout, seq_len)
    out_packed = _RoutedAttention.apply(q_packed, k.contiguous(), v.contiguous(), seg, kv)
    out = q.new_zeros(b, s, r, v.shape[-1])  # [B, S, R, E]
    return out.index_put(index, out_packed.to(out.dtype))
