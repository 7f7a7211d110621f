"""Attention for routed (token, head) pairs only: MoH's routed heads without computing masked-out heads.

Each routed head h runs the queries of the tokens routed to it, ``q[b, tokens_h, h]``, against the full keys
of its key/value head under the layer's own mask (causal or documents, intersected with its pattern),
placed at the queries' global positions. The work is ``Σ_h n_h × S`` pairs (halved by causality) instead of
``R × S × S``: for k of R routed heads active per token it is k/R of the routed heads' dense cost.

Query blocks (:func:`plan_blocks`). With the plain causal mask the local tokens are cut, in position order,
into windows of :func:`window_size` tokens. One block holds the routed queries of one window for *every*
batch row and routed head at once, ``[B, n, R]`` with n the largest count of any (row, head) in the window
(shorter ones padded with rows whose output is dropped and whose output gradient is zero, so they add
nothing to dK/dV). Against keys at positions before the window the block runs one unmasked kernel call
(the fastest dense call, shared by every head); against the window's own keys a small tile with the causal
pattern placed elementwise. Any other mask (documents, sparse patterns) gives one block per (row, head) run
against every key with the mask placed at its queries' positions.

Context parallelism. The queries stay where they are; the keys are distributed in the cp ``layout`` over
the cp group. Whatever strategy the layer's shared heads use (ring, Ulysses, hybrid, all-gather), the
routed heads pass the K/V chunks (only the key/value heads they read) around the cp group as a ring: at
step t a rank holds the chunk of rank ``r − t`` with that chunk's global positions, computes every local
block against it and merges by LSE while the next chunk arrives, so the largest K/V buffer is one chunk of
S/P tokens (two while one is in flight), never the whole sequence. Backward passes the chunks round again
with each chunk's dK/dV accumulator travelling beside it; after the last step the accumulator is one hop
from its owner. Every rank posts the same sends and receives in the same order (matching by order, as NCCL
does). Ulysses-style head scattering would not help: the routed query sets differ per head and rank.

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
from longreach.kernels import get_backend, merge_attention
from longreach.kernels.api import resolve_backend
from longreach.kernels.masks import Mask
from longreach.parallel.comm import group_ranks, p2p
from longreach.parallel.layouts import positions_for

__all__ = ["WINDOW", "QueryBlock", "RoutedPlan", "plan_blocks", "routed_attention", "supports_routed",
           "window_size"]

#: Smallest causal window, in local tokens. A window's tile computes about twice the pairs it needs, so the
#: work beyond the exact causal count is about window / S_local of it.
WINDOW = 256
#: Longer sequences get longer windows: at most this many per sequence (fewer, larger calls).
MAX_WINDOWS = 64
#: The one tag of the routed heads' ring messages (matching is by posting order).
TAG = 0


def supports_routed(inner: Any) -> bool:
    """Whether ``inner`` exposes what routed-only execution needs (backend, pattern, cp group/layout)."""
    return isinstance(inner, LocalAttention)


def window_size(n_local: int) -> int:
    """Local tokens per causal window: :data:`WINDOW`, or more so that there are at most :data:`MAX_WINDOWS`."""
    return max(WINDOW, -(-n_local // MAX_WINDOWS))


def _cp(inner: LocalAttention) -> tuple[dist.ProcessGroup | None, str, int, int]:
    """(group, layout, rank, size) of a context-parallel inner attention; size 1 for local attention."""
    if not isinstance(inner, ContextParallelAttention) or not dist.is_initialized():
        return None, "contiguous", 0, 1
    group = inner.group
    return group, inner.layout, dist.get_rank(group), dist.get_world_size(group)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(kw_only=True, slots=True)
class QueryBlock:
    """Routed queries run together: padded rows ``[Bq, n, Rq]`` of batch rows ``rows`` and routed heads ``heads``."""

    rows: slice
    heads: slice
    tokens: torch.Tensor
    """``[Bq, n, Rq]`` local token index of each query row (padding repeats a token of the same window)."""
    valid: torch.Tensor
    """``[Bq, n, Rq]`` bool: the row is a routed (token, head) pair (False: padding)."""
    q_pos: torch.Tensor
    """``[Bq, n, Rq]`` global position of each query row (CPU)."""
    window: tuple[int, int] | None
    """Causal blocks: the global positions (first, last) of the window's tokens; None: ``mask`` placed."""
    mask: Mask | None
    dst: torch.Tensor
    """``[V]`` flat index of each valid row in ``[B·S·R]`` (b, token, head)."""
    src: torch.Tensor
    """``[V]`` flat index of the same row in the block's ``[Bq·n·Rq]``."""


@dataclass(kw_only=True, slots=True)
class RoutedPlan:
    """Blocks, key/value heads and ring of one routed call."""

    blocks: list[QueryBlock]
    kv_heads: slice
    """The key/value heads the routed heads read (the ring carries only these)."""
    kv_of_head: torch.Tensor
    """``[R]`` index of each routed head's key/value head inside ``kv_heads``."""
    chunk_pos: list[torch.Tensor]
    """Sorted-or-not global positions of each cp rank's keys (one entry without context parallelism)."""
    seq_len: int
    num_heads: int
    first_head: int
    scale: float
    backend: str
    group: dist.ProcessGroup | None
    rank: int
    shape: tuple[int, int, int]
    """(B, S_local, R)."""

    @property
    def size(self) -> int:
        return len(self.chunk_pos)


def _flat_index(block_rows: int, tokens: torch.Tensor, valid: torch.Tensor, heads: slice, *, seq: int,
                routed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst, src): flat ``[B·S·R]`` index and flat block index of the valid rows of ``tokens`` ``[Bq, n, Rq]``."""
    bq, n, rq = tokens.shape
    b = torch.arange(block_rows, block_rows + bq).view(bq, 1, 1)
    h = torch.arange(heads.start, heads.stop).view(1, 1, rq)
    dst = ((b * seq + tokens) * routed + h)[valid]
    src = torch.arange(bq * n * rq).view(bq, n, rq)[valid]
    return dst, src


def _windows(pos_sorted: torch.Tensor, width: int, stride: int) -> list[tuple[int, int]]:
    """Cut sorted local positions into windows of ``width`` tokens, also where positions jump by more than
    ``stride`` (a zigzag chunk boundary), so no window's positions span a gap."""
    n = pos_sorted.numel()
    cuts = set(range(0, n, width))
    cuts |= set((torch.nonzero(pos_sorted[1:] - pos_sorted[:-1] > stride).view(-1) + 1).tolist())
    edges = sorted(cuts) + [n]
    return list(zip(edges[:-1], edges[1:]))


def plan_blocks(active: torch.Tensor, pos: torch.Tensor, *, causal: bool, row_masks: list[Mask], stride: int = 1,
                width: int | None = None) -> list[QueryBlock]:
    """Query blocks of one routed call.

    Args:
        active: ``[B, S, R]`` bool (CPU), the routed pairs; pos: ``[S]`` global positions of the local tokens.
        causal: the mask is plain causal and ``pos`` is sorted: windowed blocks over every row and head.
            Otherwise one block per (row, head) with that row's mask from ``row_masks``.
        stride: the position step of a layout without gaps (P under stripe): a larger jump starts a window.
        width: tokens per window (default :func:`window_size`).

    Returns:
        The blocks; their valid rows are every active pair exactly once.
    """
    b, s, r = active.shape
    blocks: list[QueryBlock] = []
    if not causal:
        for i in range(b):
            for j in range(r):
                tok = torch.nonzero(active[i, :, j]).view(1, -1, 1)  # [1, n, 1]
                if tok.numel() == 0:
                    continue
                valid = torch.ones_like(tok, dtype=torch.bool)
                dst, src = _flat_index(i, tok, valid, slice(j, j + 1), seq=s, routed=r)
                blocks.append(QueryBlock(rows=slice(i, i + 1), heads=slice(j, j + 1), tokens=tok, valid=valid,
                                         q_pos=pos[tok], window=None, mask=row_masks[i], dst=dst, src=src))
        return blocks
    for lo, hi in _windows(pos, width or window_size(s), stride):
        sub = active[:, lo:hi]  # [B, w, R]
        counts = sub.sum(1)  # [B, R]
        n = int(counts.max())
        if n == 0:
            continue
        # routed tokens first, in position order (a stable sort of "not routed"); padding takes the others
        first = torch.sort((~sub).to(torch.uint8), dim=1, stable=True).indices[:, :n]  # [B, n, R]
        tok = lo + first
        valid = torch.arange(n).view(1, n, 1) < counts.view(b, 1, r)  # [B, n, R]
        dst, src = _flat_index(0, tok, valid, slice(0, r), seq=s, routed=r)
        blocks.append(QueryBlock(rows=slice(0, b), heads=slice(0, r), tokens=tok, valid=valid, q_pos=pos[tok],
                                 window=(int(pos[lo]), int(pos[hi - 1])), mask=None, dst=dst, src=src))
    return blocks


# ------------------------------------------------------------------------------------------------
# one block against one K/V chunk
# ------------------------------------------------------------------------------------------------


def _gather(t: torch.Tensor, blk: QueryBlock) -> torch.Tensor:
    """Rows of ``t`` ``[B, S, R, W]`` at the block's (row, token, head): ``[Bq, n, Rq, W]``."""
    bq, _, rq = blk.tokens.shape
    b = torch.arange(blk.rows.start, blk.rows.start + bq, device=t.device).view(bq, 1, 1)
    h = torch.arange(blk.heads.start, blk.heads.stop, device=t.device).view(1, 1, rq)
    return t[b, blk.tokens.to(t.device), h]


def _block_kv(plan: RoutedPlan, blk: QueryBlock, kv: torch.Tensor) -> tuple[torch.Tensor, slice | torch.Tensor]:
    """The chunk's K/V for the block's rows and heads, ``[Bq, Sk, Hb, D+E]`` with the block's query heads in
    GQA groups over Hb, and how its heads index the chunk's (a slice view, or gathered heads)."""
    idx = plan.kv_of_head[blk.heads]
    first, count = int(idx[0]), int(idx[-1]) - int(idx[0]) + 1
    if idx.numel() % count == 0 and torch.equal(idx, torch.arange(first, first + count).repeat_interleave(
            idx.numel() // count)):
        heads: slice | torch.Tensor = slice(first, first + count)
        return kv[blk.rows, :, heads], heads
    idx = idx.to(kv.device)
    return kv[blk.rows].index_select(2, idx), idx


def _expand(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, Hb, W]`` → ``[B, S, heads, W]`` (GQA groups of consecutive query heads)."""
    return t if t.shape[2] == heads else t.repeat_interleave(heads // t.shape[2], dim=2)


def _tile_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float
                 ) -> torch.Tensor:
    """Causal scores of a window's tile: ``[Bq, Rq, n, m]`` with −inf where key position > query position."""
    s = torch.einsum("bnhd,bmhd->bhnm", q, _expand(k, q.shape[2])) * scale  # [Bq, Rq, n, m]
    allowed = q_pos.permute(0, 2, 1).unsqueeze(-1) >= k_pos.view(1, 1, 1, -1)  # [Bq, Rq, n, m]
    return s.masked_fill(~allowed, float("-inf"))


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s − lse) with rows of lse = −inf (no allowed key) giving 0."""
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return torch.exp(s - lse.unsqueeze(-1))


def _key_ranges(blk: QueryBlock, k_pos: torch.Tensor) -> tuple[int, int]:
    """(a, c) for sorted chunk keys: keys ``[0, a)`` precede the window (all allowed), ``[a, c)`` lie inside it."""
    lo, hi = blk.window  # type: ignore[misc]
    return int(torch.searchsorted(k_pos, lo)), int(torch.searchsorted(k_pos, hi, right=True))


def _forward_chunk(plan: RoutedPlan, blk: QueryBlock, qb: torch.Tensor, kv: torch.Tensor, k_pos: torch.Tensor,
                   d: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Partial (out ``[Bq, n, Rq, E]``, lse ``[Bq, Rq, n]``) of the block over disjoint key sets of one chunk."""
    kvb, _ = _block_kv(plan, blk, kv)  # [Bq, Sk, Hb, D+E]
    if blk.window is None:
        placed = blk.mask.place(blk.q_pos.view(-1), k_pos, seq_len=plan.seq_len,  # type: ignore[union-attr]
                                heads=torch.tensor([plan.first_head + blk.heads.start]), num_heads=plan.num_heads)
        backend = get_backend(resolve_backend(plan.backend, qb, placed))
        return [backend.forward(qb, kvb[..., :d], kvb[..., d:], mask=placed, scale=plan.scale)]
    a, c = _key_ranges(blk, k_pos)
    parts = []
    if a > 0:
        backend = get_backend(resolve_backend(plan.backend, qb, None))
        parts.append(backend.forward(qb, kvb[:, :a, :, :d], kvb[:, :a, :, d:], mask=None, scale=plan.scale))
    if c > a:
        acc = _acc(qb.dtype)
        kt = kvb[:, a:c].to(acc)  # [Bq, m, Hb, D+E]
        s = _tile_scores(qb.to(acc), kt[..., :d], blk.q_pos.to(qb.device), k_pos[a:c].to(qb.device), plan.scale)
        lse = torch.logsumexp(s, dim=-1)  # [Bq, Rq, n]
        out = torch.einsum("bhnm,bmhe->bnhe", _probs(s, lse), _expand(kt[..., d:], qb.shape[2]))  # [Bq, n, Rq, E]
        parts.append((out, lse))
    return parts


def _backward_chunk(plan: RoutedPlan, blk: QueryBlock, qb: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, kv: torch.Tensor, k_pos: torch.Tensor, dkv: torch.Tensor, d: int
                    ) -> torch.Tensor:
    """Gradients of the block against one chunk: adds dK/dV into ``dkv`` ``[B, Sk, Hs, D+E]`` and returns dq
    ``[Bq, n, Rq, D]`` (accumulation dtype). ``out``/``lse`` are the block's global results."""
    kvb, heads = _block_kv(plan, blk, kv)
    target = dkv[blk.rows]  # [Bq, Sk, Hs, D+E] (a view: slice of rows)
    acc = dkv.dtype

    def add(keys: slice, gk: torch.Tensor, gv: torch.Tensor) -> None:
        g = torch.cat([gk, gv], dim=-1).to(acc)  # [Bq, m, Hb, D+E]
        if isinstance(heads, slice):
            target[:, keys, heads].add_(g)
        else:
            target[:, keys].index_add_(2, heads, g)

    if blk.window is None:
        placed = blk.mask.place(blk.q_pos.view(-1), k_pos, seq_len=plan.seq_len,  # type: ignore[union-attr]
                                heads=torch.tensor([plan.first_head + blk.heads.start]), num_heads=plan.num_heads)
        backend = get_backend(resolve_backend(plan.backend, qb, placed))
        gq, gk, gv = backend.backward(dout, qb, kvb[..., :d], kvb[..., d:], out, lse, mask=placed, scale=plan.scale)
        add(slice(None), gk, gv)
        return gq.to(acc)
    a, c = _key_ranges(blk, k_pos)
    dq = torch.zeros(qb.shape, dtype=acc, device=qb.device)  # [Bq, n, Rq, D]
    if a > 0:
        backend = get_backend(resolve_backend(plan.backend, qb, None))
        gq, gk, gv = backend.backward(dout, qb, kvb[:, :a, :, :d], kvb[:, :a, :, d:], out, lse, mask=None,
                                      scale=plan.scale)
        dq += gq
        add(slice(0, a), gk, gv)
    if c > a:
        rq = qb.shape[2]
        qf, kt, do = qb.to(acc), kvb[:, a:c].to(acc), dout.to(acc)
        kx, vx = _expand(kt[..., :d], rq), _expand(kt[..., d:], rq)  # [Bq, m, Rq, D], [Bq, m, Rq, E]
        p = _probs(_tile_scores(qf, kt[..., :d], blk.q_pos.to(qb.device), k_pos[a:c].to(qb.device), plan.scale),
                   lse.to(acc))  # [Bq, Rq, n, m]
        delta = (do * out.to(acc)).sum(-1).permute(0, 2, 1).unsqueeze(-1)  # [Bq, Rq, n, 1]
        ds = p * (torch.einsum("bnhe,bmhe->bhnm", do, vx) - delta) * plan.scale  # [Bq, Rq, n, m]
        dq += torch.einsum("bhnm,bmhd->bnhd", ds, kx)
        gk = torch.einsum("bhnm,bnhd->bmhd", ds, qf)  # [Bq, m, Rq, D]
        gv = torch.einsum("bhnm,bnhe->bmhe", p, do)  # [Bq, m, Rq, E]
        hb = kvb.shape[2]
        if hb != rq:  # sum each GQA group of query heads onto its key/value head
            gk, gv = gk.view(*gk.shape[:2], hb, rq // hb, -1).sum(3), gv.view(*gv.shape[:2], hb, rq // hb, -1).sum(3)
        add(slice(a, c), gk, gv)
    return dq


# ------------------------------------------------------------------------------------------------
# the ring over the cp group (one step without context parallelism)
# ------------------------------------------------------------------------------------------------


def _peers(plan: RoutedPlan) -> tuple[int, int]:
    """Global ranks of the next and previous members of the cp group."""
    ranks = group_ranks(plan.group)
    return ranks[(plan.rank + 1) % plan.size], ranks[(plan.rank - 1) % plan.size]


def _wait(works: list[dist.Work]) -> None:
    for w in works:
        w.wait()


def _chunks(plan: RoutedPlan, kv: torch.Tensor):
    """Yield (step, source rank, the source's K/V chunk) round the ring, receiving the next chunk while the
    caller computes on the current one (two chunk buffers, reused)."""
    nxt_peer, prev_peer = (_peers(plan) if plan.size > 1 else (0, 0))
    spare: torch.Tensor | None = None
    cur = kv
    for t in range(plan.size):
        works: list[dist.Work] = []
        incoming = None
        if t + 1 < plan.size:
            incoming = spare if spare is not None else torch.empty_like(kv)  # [B, S/P, Hs, D+E]
            works = p2p([(cur, nxt_peer, TAG)], [(incoming, prev_peer, TAG)])
        yield t, (plan.rank - t) % plan.size, cur
        _wait(works)
        spare, cur = cur, incoming  # the sent chunk's buffer receives the chunk after next


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RoutedPlan):  # type: ignore[override]
        b, s, r = plan.shape
        d, e = k.shape[-1], v.shape[-1]
        acc = _acc(q.dtype)
        kv = torch.cat([k[:, :, plan.kv_heads], v[:, :, plan.kv_heads]], dim=-1)  # [B, S, Hs, D+E]
        qbs = [_gather(q, blk) for blk in plan.blocks]  # each [Bq, n, Rq, D]
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(plan.blocks)
        for _, src, chunk in _chunks(plan, kv):
            for i, blk in enumerate(plan.blocks):
                for o, l in _forward_chunk(plan, blk, qbs[i], chunk, plan.chunk_pos[src], d):
                    o, l = o.to(acc), l.to(acc)
                    results[i] = (o, l) if results[i] is None else merge_attention(*results[i], o, l)
        out = q.new_zeros(b * s * r, e)  # [B·S·R, E]
        saved = []
        for blk, qb, res in zip(plan.blocks, qbs, results):
            if res is None:  # no key allowed anywhere: out 0, lse −inf
                res = (qb.new_zeros(*qb.shape[:3], e, dtype=acc), qb.new_full(
                    (qb.shape[0], qb.shape[2], qb.shape[1]), float("-inf"), dtype=acc))
            out.index_copy_(0, blk.dst.to(q.device), res[0].reshape(-1, e)[blk.src.to(q.device)].to(q.dtype))
            saved.append(res)
        ctx.save_for_backward(q, k, v)
        ctx.plan, ctx.results = plan, saved
        return out.view(b, s, r, e)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        plan: RoutedPlan = ctx.plan
        b, s, r = plan.shape
        d, e = k.shape[-1], v.shape[-1]
        acc = _acc(q.dtype)
        kv = torch.cat([k[:, :, plan.kv_heads], v[:, :, plan.kv_heads]], dim=-1)  # [B, S, Hs, D+E]
        qbs = [_gather(q, blk) for blk in plan.blocks]
        douts = [_gather(dout, blk) * blk.valid.to(dout.device).unsqueeze(-1) for blk in plan.blocks]  # padding: 0
        dqs = [torch.zeros(qb.shape, dtype=acc, device=q.device) for qb in qbs]
        nxt_peer, prev_peer = (_peers(plan) if plan.size > 1 else (0, 0))
        pending: list[dist.Work] = []
        sent: torch.Tensor | None = None
        received: torch.Tensor | None = None
        for t, src, chunk in _chunks(plan, kv):
            dkv = torch.zeros(chunk.shape, dtype=acc, device=chunk.device)  # [B, Sk, Hs, D+E]
            for i, blk in enumerate(plan.blocks):
                o, l = ctx.results[i]
                dqs[i] += _backward_chunk(plan, blk, qbs[i], douts[i], o, l, chunk, plan.chunk_pos[src], dkv, d)
            # this source's accumulator so far arrives from the previous member; add it and pass it on (after
            # the last step the next member is the owner)
            _wait(pending)
            if received is not None:
                dkv += received
            if plan.size == 1:
                received = dkv
                break
            received = torch.empty_like(dkv) if sent is None else sent
            pending = p2p([(dkv, nxt_peer, TAG)], [(received, prev_peer, TAG)])
            sent = dkv
        _wait(pending)
        dkv_own = received  # [B, S, Hs, D+E]: every rank's gradients of this rank's K/V
        dq = q.new_zeros(b * s * r, d, dtype=acc)  # [B·S·R, D]
        for blk, g in zip(plan.blocks, dqs):
            dq.index_copy_(0, blk.dst.to(q.device), g.reshape(-1, d)[blk.src.to(q.device)])
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        dk[:, :, plan.kv_heads] = dkv_own[..., :d].to(k.dtype)
        dv[:, :, plan.kv_heads] = dkv_own[..., d:].to(v.dtype)
        return dq.view(b, s, r, d).to(q.dtype), dk, dv, None


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
        chunk_pos = [positions_for(seq_len, layout, j, size) for j in range(size)]
    else:
        pos = ctx.positions.cpu() if ctx.positions is not None else torch.arange(s)
        chunk_pos = [pos]
    per_row = isinstance(ctx.cu_seqlens, (tuple, list))
    extra = inner.extra_mask(ctx)
    row_masks = [base_mask(replace(ctx, cu_seqlens=ctx.cu_seqlens[i]) if per_row else ctx, extra) for i in range(b)]
    # plain causal attention with every rank's keys in position order: windowed blocks (see plan_blocks)
    causal = extra is None and ctx.cu_seqlens is None and all(bool((p[1:] > p[:-1]).all()) for p in chunk_pos)
    group_size = num_heads // hkv
    heads_kv = (first_head + torch.arange(r)) // group_size  # [R] key/value head of each routed head
    kv_lo = int(heads_kv[0])
    plan = RoutedPlan(
        blocks=plan_blocks(active.cpu(), pos, causal=causal, row_masks=row_masks, stride=size),
        kv_heads=slice(kv_lo, int(heads_kv[-1]) + 1), kv_of_head=heads_kv - kv_lo, chunk_pos=chunk_pos,
        seq_len=seq_len, num_heads=num_heads, first_head=first_head,
        scale=ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(d), backend=inner.backend, group=group,
        rank=rank, shape=(b, s, r))
    return _RoutedAttention.apply(q, k, v, plan)
