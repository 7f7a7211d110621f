"""Attention for routed (token, head) pairs only: MoH's routed heads without computing masked-out heads.

Each routed head h runs the queries of the tokens routed to it, ``q[b, tokens_h, h]``, against the full keys
of its key/value head under the layer's own mask (causal or documents, intersected with its pattern),
placed at the queries' global positions. The work is ``Σ_h n_h × S`` pairs (halved by causality) instead of
``R × S × S``: for k of R routed heads active per token it is k/R of the routed heads' dense cost.

Query blocks (:func:`plan_blocks`). With the plain causal mask the local tokens are cut, in position order,
into windows of :func:`window_size` tokens. One block holds the routed queries of one window for *every*
batch row and routed head at once, ``[B, n, R]`` with n the largest count of any (row, head) in the window
(shorter ones padded with rows whose output is dropped; in backward their queries and output gradients are
zero, so they add nothing to dK/dV). Against keys at positions before the window the block runs unmasked
kernel calls (the fastest dense call, shared by every head): consecutive windows are grouped into coarse
blocks of at least :data:`COARSE_ROWS` rows that run every key before the group in one call, and each
window runs the keys of its group before it. Against the window's own keys a small tile runs with the causal
pattern placed elementwise (on the CPU flash kernel as an additive mask). Results merge by LSE into one row
per routed pair. Any other mask (documents, sparse patterns) gives one block per (row, head) run against
every key with the mask placed at its queries' positions.

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
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Iterator

import torch
import torch.distributed as dist

from longreach.attention import AttentionContext, ContextParallelAttention, LocalAttention, base_mask
from longreach.kernels import get_backend, merge_attention
from longreach.kernels.api import resolve_backend
from longreach.kernels.masks import Mask
from longreach.parallel.comm import group_ranks, p2p
from longreach.parallel.layouts import positions_for

__all__ = ["COARSE_ROWS", "WINDOW", "QueryBlock", "RoutedPlan", "plan_blocks", "routed_attention", "supports_routed",
           "window_size"]

#: Smallest causal window, in local tokens. A window's tile computes about twice the pairs it needs, so the
#: work beyond the exact causal count is about window / S_local of it.
WINDOW = 256
#: Longer sequences get longer windows: at most this many per sequence (fewer, larger calls).
MAX_WINDOWS = 64
#: Routed query rows of a coarse block (see :func:`plan_blocks`): fewer, longer unmasked calls (the CPU flash
#: kernel also switches to 256-row query tiles from 768 rows). At 8k tokens on one CPU thread the routed
#: forward took about 0.57 s of CPU without coarse blocks and 0.42 s with them.
COARSE_ROWS = 768
#: A window's (row, head) query sets are padded into one block while the routed rows fill at least this
#: share of it; below (unbalanced routing, e.g. one head taking every token) each runs as its own block.
MIN_FILL = 2 / 3
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
    keys: tuple[int, int] | None
    """Causal blocks: the global key positions ``[lo, hi)`` run in one unmasked call (all before the queries);
    None: ``mask`` placed against every key."""
    tile: tuple[int, int] | None
    """Causal blocks: the global key positions ``[first, last]`` of the block's own window, run with the causal
    pattern placed elementwise (None: no tile)."""
    mask: Mask | None
    """Other masks: the layer's mask, placed at the queries' positions against every key."""
    dst: torch.Tensor
    """``[V]`` index of each valid row among the routed pairs (``active`` flattened, in (b, token, head) order)."""
    src: torch.Tensor
    """``[V]`` flat index of the same row in the block's ``[Bq·n·Rq]``."""


@dataclass(kw_only=True, slots=True)
class RoutedPlan:
    """Blocks, key/value heads and ring of one routed call."""

    blocks: list[QueryBlock]
    pairs: torch.Tensor
    """``[N]`` flat index in ``[B·S·R]`` of every routed pair, in order (the packed rows)."""
    kv_heads: slice
    """The key/value heads the routed heads read (the ring carries only these)."""
    kv_of_head: torch.Tensor
    """``[R]`` index of each routed head's key/value head inside ``kv_heads``."""
    chunk_pos: list[torch.Tensor]
    """Global positions of each cp rank's keys (one entry without context parallelism)."""
    seq_len: int
    num_heads: int
    first_head: int
    scale: float
    backend: str
    group: dist.ProcessGroup | None
    rank: int
    shape: tuple[int, int, int]
    """(B, S_local, R)."""
    kv_index: dict[tuple[int, int], slice | torch.Tensor] = field(default_factory=dict)
    """Per routed-head range of a block: its key/value heads (a slice in GQA groups, or gathered heads)."""

    @property
    def size(self) -> int:
        return len(self.chunk_pos)


def _windows(pos_sorted: torch.Tensor, width: int, stride: int) -> list[list[tuple[int, int]]]:
    """Runs of sorted local positions without gaps (a jump by more than ``stride``: a zigzag chunk boundary),
    each cut into windows of at most ``width`` tokens ``(lo, hi)``."""
    n = pos_sorted.numel()
    gaps = (torch.nonzero(pos_sorted[1:] - pos_sorted[:-1] > stride).view(-1) + 1).tolist()
    runs = []
    for a, b in zip([0] + gaps, gaps + [n]):
        edges = list(range(a, b, width)) + [b]
        runs.append(list(zip(edges[:-1], edges[1:])))
    return runs


def _coarse_groups(counts: list[torch.Tensor], coarse_rows: int) -> list[tuple[int, int, bool]]:
    """Group consecutive windows of one run, from its end backwards, until some (row, head) has
    ``coarse_rows`` routed queries: ``(first, stop, coarse)`` window ranges; the windows left at the start of
    the run (fewer rows) form a group with ``coarse`` False."""
    groups = []
    stop = len(counts)
    total = torch.zeros_like(counts[0]) if counts else None
    for i in range(len(counts) - 1, -1, -1):
        total = total + counts[i]
        if int(total.max()) >= coarse_rows:
            groups.append((i, stop, True))
            stop, total = i, torch.zeros_like(total)
    if stop > 0:
        groups.append((0, stop, False))
    return groups[::-1]


def plan_blocks(active: torch.Tensor, pos: torch.Tensor, *, causal: bool, row_masks: list[Mask], stride: int = 1,
                width: int | None = None, coarse_rows: int | None = None) -> list[QueryBlock]:
    """Query blocks of one routed call.

    Causal blocks hold every batch row and routed head of a window, padded to the largest (row, head) count,
    unless the routed rows would fill less than :data:`MIN_FILL` of that (then one block per (row, head)).
    They come in two levels. Consecutive windows are grouped (from the end of the sequence back)
    until some (row, head) has ``coarse_rows`` routed queries; such a group's queries run as one coarse block
    against every key before the group (one unmasked call of many rows). Each window of the group then runs
    the keys of the group before it unmasked and its own keys as a causal tile. Windows of a group too small
    to be coarse run every key before them themselves.

    Args:
        active: ``[B, S, R]`` bool (CPU), the routed pairs; pos: ``[S]`` global positions of the local tokens.
        causal: the mask is plain causal and ``pos`` is sorted: windowed blocks over every row and head.
            Otherwise one block per (row, head) with that row's mask from ``row_masks``.
        stride: the position step of a layout without gaps (P under stripe): a larger jump starts a new run.
        width: tokens per window (default :func:`window_size`); coarse_rows: default :data:`COARSE_ROWS`.

    Returns:
        The blocks. Every routed pair is a valid row of exactly one block that is not coarse, and of at most
        one coarse block; padded rows (``valid`` False) belong to the block's window.
    """
    b, s, r = active.shape
    flat = active.reshape(-1)
    packed = torch.full((flat.numel(),), -1, dtype=torch.long)
    packed[flat] = torch.arange(int(flat.sum()))  # flat (b, token, head) -> index among the routed pairs

    def block(rows: slice, heads: slice, tok: torch.Tensor, valid: torch.Tensor, **kw: Any) -> QueryBlock:
        bq, n, rq = tok.shape
        bi = torch.arange(rows.start, rows.start + bq).view(bq, 1, 1)
        hi = torch.arange(heads.start, heads.stop).view(1, 1, rq)
        return QueryBlock(rows=rows, heads=heads, tokens=tok, valid=valid, q_pos=pos[tok],
                          dst=packed[((bi * s + tok) * r + hi)[valid]], src=torch.arange(bq * n * rq)[valid.view(-1)],
                          **kw)

    blocks: list[QueryBlock] = []
    if not causal:
        for i in range(b):
            for j in range(r):
                tok = torch.nonzero(active[i, :, j]).view(1, -1, 1)  # [1, n, 1]
                if tok.numel():
                    blocks.append(block(slice(i, i + 1), slice(j, j + 1), tok, torch.ones_like(tok, dtype=torch.bool),
                                        keys=None, tile=None, mask=row_masks[i]))
        return blocks

    def window_block(lo: int, hi: int, keys: tuple[int, int], tile: tuple[int, int] | None) -> None:
        sub = active[:, lo:hi]  # [B, w, R]
        counts = sub.sum(1)  # [B, R]
        n = int(counts.max())
        if n == 0:
            return
        if int(counts.sum()) < MIN_FILL * b * r * n:  # unbalanced routing: one block per (row, head), no padding
            for i, j in torch.nonzero(counts).tolist():
                tok = lo + torch.nonzero(sub[i, :, j]).view(1, -1, 1)  # [1, n_ij, 1]
                blocks.append(block(slice(i, i + 1), slice(j, j + 1), tok, torch.ones_like(tok, dtype=torch.bool),
                                    keys=keys, tile=tile, mask=None))
            return
        # routed tokens first, in position order (a stable sort of "not routed"); padding takes the others
        first = torch.sort((~sub).to(torch.uint8), dim=1, stable=True).indices[:, :n]  # [B, n, R]
        valid = torch.arange(n).view(1, n, 1) < counts.view(b, 1, r)  # [B, n, R]
        blocks.append(block(slice(0, b), slice(0, r), lo + first, valid, keys=keys, tile=tile, mask=None))

    for run in _windows(pos, width or window_size(s), stride):
        counts = [active[:, lo:hi].sum(1) for lo, hi in run]  # each [B, R]
        for g0, g1, coarse in _coarse_groups(counts, coarse_rows or COARSE_ROWS):
            start = int(pos[run[g0][0]])
            if coarse:
                window_block(run[g0][0], run[g1 - 1][1], (0, start), None)
            for lo, hi in run[g0:g1]:
                first = int(pos[lo])
                window_block(lo, hi, (start if coarse else 0, first), (first, int(pos[hi - 1])))
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


def _block_kv(plan: RoutedPlan, blk: QueryBlock, chunk: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, slice | torch.Tensor]:
    """The chunk's K ``[Bq, Sk, Hb, D]`` and V ``[Bq, Sk, Hb, E]`` for the block's rows and heads, the block's
    query heads in GQA groups over Hb, and how its heads index the chunk's (a slice view, or gathered heads)."""
    kc, vc = chunk
    key = (blk.heads.start, blk.heads.stop)
    heads = plan.kv_index.get(key)
    if heads is None:  # once per plan and head range
        idx = plan.kv_of_head[blk.heads]
        first, count = int(idx[0]), int(idx[-1]) - int(idx[0]) + 1
        grouped = idx.numel() % count == 0 and torch.equal(
            idx, torch.arange(first, first + count).repeat_interleave(idx.numel() // count))
        heads = plan.kv_index[key] = slice(first, first + count) if grouped else idx.to(kc.device)
    if isinstance(heads, slice):
        return kc[blk.rows, :, heads], vc[blk.rows, :, heads], heads
    return kc[blk.rows].index_select(2, heads), vc[blk.rows].index_select(2, heads), heads


def _expand(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, Hb, W]`` → ``[B, S, heads, W]`` (GQA groups of consecutive query heads)."""
    return t if t.shape[2] == heads else t.repeat_interleave(heads // t.shape[2], dim=2)


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Causal pattern of a tile: ``[Bq, Rq, n, m]``, key position <= query position."""
    return q_pos.permute(0, 2, 1).unsqueeze(-1) >= k_pos.view(1, 1, 1, -1)


_CPU_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _on_cpu_kernel(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a tile runs on the CPU flash kernel with an additive mask (else materialised scores)."""
    return backend == "cpu" and q.device.type == "cpu" and k.shape[-1] == v.shape[-1]


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask: 0 where allowed, −inf elsewhere."""
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype))


def _tile_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                  cpu_kernel: bool, may_be_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal tile: q ``[Bq, n, Rq, D]`` against k ``[Bq, m, Rq, D]``, v ``[Bq, m, Rq, E]`` with ``allowed``
    ``[Bq, Rq, n, m]``. Returns out ``[Bq, n, Rq, E]`` and lse ``[Bq, Rq, n]`` (rows with no allowed key:
    0 and −inf; ``may_be_empty`` False promises there are none, as when the tile holds each row's own key)."""
    acc = _acc(q.dtype)
    if not cpu_kernel:  # rows with no allowed key: lse −inf, and every p of the row masked to 0
        sc = torch.einsum("bnhd,bmhd->bhnm", q.to(acc), k.to(acc)) * scale  # [Bq, Rq, n, m]
        lse = torch.logsumexp(sc.masked_fill(~allowed, float("-inf")), dim=-1)  # [Bq, Rq, n]
        p = torch.exp(sc - lse.unsqueeze(-1)).masked_fill_(~allowed, 0.0)
        return torch.einsum("bhnm,bmhe->bnhe", p, v.to(acc)), lse  # [Bq, n, Rq, E]
    out, lse = _CPU_FWD(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
                        attn_mask=_bias(allowed, q.dtype), scale=scale)
    out, lse = out.transpose(1, 2).to(acc), lse.to(acc)  # [Bq, n, Rq, E], [Bq, Rq, n]
    if may_be_empty:
        none = ~allowed.any(-1)  # [Bq, Rq, n]
        out = out.masked_fill(none.permute(0, 2, 1).unsqueeze(-1), 0.0)
        lse = lse.masked_fill(none, float("-inf"))
    return out, lse


def _tile_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, allowed: torch.Tensor, scale: float, cpu_kernel: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a causal tile (shapes as :func:`_tile_forward`) given the rows' *global* out and lse
    (finite). Returns dq, dk, dv in the accumulation dtype."""
    acc = _acc(q.dtype)
    if cpu_kernel:
        dq, dk, dv = _CPU_BWD(dout.transpose(1, 2).to(q.dtype).contiguous(), q.transpose(1, 2), k.transpose(1, 2),
                              v.transpose(1, 2), out.transpose(1, 2).to(q.dtype).contiguous(),
                              lse.to(acc).contiguous(), 0.0, False, attn_mask=_bias(allowed, q.dtype), scale=scale)
        return dq.transpose(1, 2).to(acc), dk.transpose(1, 2).to(acc), dv.transpose(1, 2).to(acc)
    qf, kf, vf, do = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    sc = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale  # [Bq, Rq, n, m]
    p = torch.exp(sc - lse.to(acc).unsqueeze(-1)).masked_fill_(~allowed, 0.0)  # [Bq, Rq, n, m]
    delta = (do * out.to(acc)).sum(-1).permute(0, 2, 1).unsqueeze(-1)  # [Bq, Rq, n, 1]
    ds = p * (torch.einsum("bnhe,bmhe->bhnm", do, vf) - delta) * scale  # [Bq, Rq, n, m]
    return (torch.einsum("bhnm,bmhd->bnhd", ds, kf), torch.einsum("bhnm,bnhd->bmhd", ds, qf),
            torch.einsum("bhnm,bnhe->bmhe", p, do))


def _place(plan: RoutedPlan, blk: QueryBlock, k_pos: torch.Tensor, q: torch.Tensor) -> tuple[Any, ModuleType]:
    """The block's mask placed against one chunk's keys, and the backend that runs it."""
    placed = blk.mask.place(blk.q_pos.view(-1), k_pos, seq_len=plan.seq_len,  # type: ignore[union-attr]
                            heads=torch.tensor([plan.first_head + blk.heads.start]), num_heads=plan.num_heads)
    return placed, get_backend(resolve_backend(plan.backend, q, placed))


def _ranges(blk: QueryBlock, k_pos: torch.Tensor) -> tuple[slice, slice]:
    """Index ranges of a sorted chunk's keys: those run unmasked, and those of the block's causal tile."""
    lo, hi = blk.keys  # type: ignore[misc]
    keys = slice(int(torch.searchsorted(k_pos, lo)), int(torch.searchsorted(k_pos, hi)))
    if blk.tile is None:
        return keys, slice(0, 0)
    first, last = blk.tile
    return keys, slice(int(torch.searchsorted(k_pos, first)), int(torch.searchsorted(k_pos, last, right=True)))


def _forward_chunk(plan: RoutedPlan, blk: QueryBlock, qb: torch.Tensor, chunk: tuple[torch.Tensor, torch.Tensor],
                   k_pos: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Partials (part, out ``[Bq, n, Rq, E]``, lse ``[Bq, Rq, n]``) of the block over disjoint key sets of one
    chunk; part 0: the unmasked (or mask-placed) keys, 1: the causal tile."""
    kb, vb, _ = _block_kv(plan, blk, chunk)  # [Bq, Sk, Hb, D], [Bq, Sk, Hb, E]
    if blk.keys is None:
        placed, backend = _place(plan, blk, k_pos, qb)
        return [(0, *backend.forward(qb, kb, vb, mask=placed, scale=plan.scale))]
    keys, tile = _ranges(blk, k_pos)
    parts = []
    if keys.stop > keys.start:
        backend = get_backend(resolve_backend(plan.backend, qb, None))
        parts.append((0, *backend.forward(qb, kb[:, keys], vb[:, keys], mask=None, scale=plan.scale)))
    if tile.stop > tile.start:
        rq = qb.shape[2]
        allowed = _allowed(blk.q_pos.to(qb.device), k_pos[tile].to(qb.device))  # [Bq, Rq, n, m]
        out, lse = _tile_forward(qb, _expand(kb[:, tile], rq), _expand(vb[:, tile], rq), allowed, plan.scale,
                                 _on_cpu_kernel(resolve_backend(plan.backend, qb, None), qb, kb, vb), plan.size > 1)
        parts.append((1, out, lse))
    return parts


def _backward_chunk(plan: RoutedPlan, blk: QueryBlock, qb: torch.Tensor, dout: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, chunk: tuple[torch.Tensor, torch.Tensor], k_pos: torch.Tensor,
                    grads: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
    """Gradients of the block against one chunk: adds dK/dV into ``grads`` (``[B, Sk, Hs, D]``,
    ``[B, Sk, Hs, E]``) and returns dq ``[Bq, n, Rq, D]`` (accumulation dtype; None: no key of the chunk).
    ``out``/``lse`` are the block rows' global results (padded rows: zero queries, output gradients and
    outputs, lse 0)."""
    kb, vb, heads = _block_kv(plan, blk, chunk)
    acc = grads[0].dtype

    def add(keys: slice, gk: torch.Tensor, gv: torch.Tensor) -> None:  # gk [Bq, m, Hb, D], gv [Bq, m, Hb, E]
        for target, g in zip(grads, (gk, gv)):
            if isinstance(heads, slice):
                target[blk.rows, keys, heads].add_(g)
            else:
                target[blk.rows, keys].index_add_(2, heads, g.to(acc))

    if blk.keys is None:
        placed, backend = _place(plan, blk, k_pos, qb)
        gq, gk, gv = backend.backward(dout, qb, kb, vb, out, lse, mask=placed, scale=plan.scale)
        add(slice(None), gk, gv)
        return gq.to(acc)
    keys, tile = _ranges(blk, k_pos)
    dq = None
    if keys.stop > keys.start:
        backend = get_backend(resolve_backend(plan.backend, qb, None))
        gq, gk, gv = backend.backward(dout, qb, kb[:, keys], vb[:, keys], out, lse, mask=None, scale=plan.scale)
        dq = gq.to(acc)
        add(keys, gk, gv)
    if tile.stop > tile.start:
        rq = qb.shape[2]
        allowed = _allowed(blk.q_pos.to(qb.device), k_pos[tile].to(qb.device))  # [Bq, Rq, n, m]
        gq, gk, gv = _tile_backward(dout, qb, _expand(kb[:, tile], rq), _expand(vb[:, tile], rq), out, lse, allowed,
                                    plan.scale, _on_cpu_kernel(resolve_backend(plan.backend, qb, None), qb, kb, vb))
        dq = gq if dq is None else dq + gq
        hb = kb.shape[2]
        if hb != rq:  # sum each GQA group of query heads onto its key/value head
            gk, gv = gk.view(*gk.shape[:2], hb, rq // hb, -1).sum(3), gv.view(*gv.shape[:2], hb, rq // hb, -1).sum(3)
        add(tile, gk, gv)
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


def _chunks(plan: RoutedPlan, k: torch.Tensor, v: torch.Tensor
            ) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Yield (source rank, its K ``[B, S/P, Hs, D]`` and V ``[B, S/P, Hs, E]``) round the ring, receiving the
    next chunk (K and V in one message) while the caller computes on the current one; two chunk buffers."""
    if plan.size == 1:
        yield plan.rank, (k, v)
        return
    d = k.shape[-1]
    nxt_peer, prev_peer = _peers(plan)
    spare: torch.Tensor | None = None
    cur = torch.cat([k, v], dim=-1)  # [B, S/P, Hs, D+E]
    for t in range(plan.size):
        works: list[dist.Work] = []
        incoming = None
        if t + 1 < plan.size:
            incoming = spare if spare is not None else torch.empty_like(cur)
            works = p2p([(cur, nxt_peer, TAG)], [(incoming, prev_peer, TAG)])
        yield (plan.rank - t) % plan.size, (cur[..., :d], cur[..., d:])
        _wait(works)
        spare, cur = cur, incoming  # the sent chunk's buffer receives the chunk after next


def _padded(packed: torch.Tensor, blk: QueryBlock) -> torch.Tensor:
    """Rows ``[N, W]`` of the routed pairs → the block's ``[Bq·n·Rq, W]`` (padding rows 0)."""
    out = packed.new_zeros(blk.valid.numel(), packed.shape[-1])
    return out.index_copy_(0, blk.src.to(packed.device), packed[blk.dst.to(packed.device)])


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RoutedPlan):  # type: ignore[override]
        b, s, r = plan.shape
        e = v.shape[-1]
        acc = _acc(q.dtype)
        qbs = [_gather(q, blk) for blk in plan.blocks]  # each [Bq, n, Rq, D]
        # per block and part (keys, tile), merged over the ring's chunks
        results: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [[None, None] for _ in plan.blocks]
        for src, chunk in _chunks(plan, k[:, :, plan.kv_heads], v[:, :, plan.kv_heads]):
            for i, blk in enumerate(plan.blocks):
                for part, o, l in _forward_chunk(plan, blk, qbs[i], chunk, plan.chunk_pos[src]):
                    o, l, prev = o.to(acc), l.to(acc), results[i][part]
                    results[i][part] = (o, l) if prev is None else merge_attention(*prev, o, l)
        # into one row per routed pair, by kind of partial: every pair has at most one of each (a window
        # block's keys and tile, a coarse block's keys), so each kind is one copy or one merge over all rows
        n = plan.pairs.numel()
        kinds: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[], [], []]  # keys, tile, coarse
        for blk, res in zip(plan.blocks, results):
            coarse = blk.keys is not None and blk.tile is None
            src = blk.src.to(q.device)
            for part, r_part in enumerate(res):
                if r_part is not None:
                    kinds[2 if coarse else part].append((blk.dst.to(q.device), r_part[0].reshape(-1, e)[src],
                                                         r_part[1].permute(0, 2, 1).reshape(-1)[src]))
        out = torch.zeros((n, e), dtype=acc, device=q.device)  # [N, E]
        lse = torch.full((n,), float("-inf"), dtype=acc, device=q.device)  # [N]
        for kind, rows in enumerate(kinds):
            if not rows:
                continue
            dst, o, l = (torch.cat(t) for t in zip(*rows))
            if kind == 0:
                out.index_copy_(0, dst, o)
                lse.index_copy_(0, dst, l)
                continue
            o, l = merge_attention(out[dst].view(1, -1, 1, e), lse[dst].view(1, 1, -1), o.view(1, -1, 1, e),
                                   l.view(1, 1, -1))
            out[dst], lse[dst] = o.view(-1, e), l.view(-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        full = q.new_zeros(b * s * r, e)  # [B·S·R, E]
        return full.index_copy_(0, plan.pairs.to(q.device), out.to(q.dtype)).view(b, s, r, e)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        plan: RoutedPlan = ctx.plan
        b, s, r = plan.shape
        d, e = k.shape[-1], v.shape[-1]
        acc = _acc(q.dtype)
        pairs = plan.pairs.to(q.device)
        q_rows = q.reshape(-1, d)[pairs]  # [N, D]
        dout_rows = dout.reshape(-1, e)[pairs]  # [N, E]
        lse_rows = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).view(-1, 1)  # [N, 1]
        blocks = []  # per block: q, dout, out [Bq, n, Rq, *] and lse [Bq, Rq, n]; padded rows all 0
        for blk in plan.blocks:
            shape = tuple(blk.valid.shape)
            blocks.append((_padded(q_rows, blk).view(*shape, d), _padded(dout_rows, blk).view(*shape, e),
                           _padded(out, blk).view(*shape, e), _padded(lse_rows, blk).view(shape).permute(0, 2, 1)))
        dq_rows = torch.zeros((pairs.numel(), d), dtype=acc, device=q.device)  # [N, D]
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        direct = plan.size == 1 and k.dtype == v.dtype == acc  # accumulate straight into dK/dV
        pending: list[dist.Work] = []
        sent: torch.Tensor | None = None
        received: torch.Tensor | None = None
        for src, chunk in _chunks(plan, k[:, :, plan.kv_heads], v[:, :, plan.kv_heads]):
            if direct:
                grads = (dk[:, :, plan.kv_heads], dv[:, :, plan.kv_heads])
            else:
                dkv = torch.zeros(chunk[0].shape[:3] + (d + e,), dtype=acc, device=q.device)  # [B, Sk, Hs, D+E]
                grads = (dkv[..., :d], dkv[..., d:])
            for blk, (qb, dob, ob, lb) in zip(plan.blocks, blocks):
                g = _backward_chunk(plan, blk, qb, dob, ob, lb, chunk, plan.chunk_pos[src], grads)
                if g is not None:
                    dq_rows.index_add_(0, blk.dst.to(q.device), g.reshape(-1, d)[blk.src.to(q.device)])
            if plan.size == 1:
                received = None if direct else dkv
                break
            # this source's accumulator so far arrives from the previous member; add it and pass it on (after
            # the last step the next member is the owner)
            _wait(pending)
            if received is not None:
                dkv += received
            received = torch.empty_like(dkv) if sent is None else sent
            pending = p2p([(dkv, _peers(plan)[0], TAG)], [(received, _peers(plan)[1], TAG)])
            sent = dkv
        _wait(pending)
        if received is not None:  # [B, S, Hs, D+E]: every rank's gradients of this rank's K/V
            dk[:, :, plan.kv_heads] = received[..., :d].to(k.dtype)
            dv[:, :, plan.kv_heads] = received[..., d:].to(v.dtype)
        dq = q.new_zeros(b * s * r, d)  # [B·S·R, D]
        dq.index_copy_(0, pairs, dq_rows.to(q.dtype))
        return dq.view(b, s, r, d), dk, dv, None


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
    act = active.cpu()
    plan = RoutedPlan(
        blocks=plan_blocks(act, pos, causal=causal, row_masks=row_masks, stride=size),
        pairs=torch.nonzero(act.reshape(-1)).view(-1),
        kv_heads=slice(kv_lo, int(heads_kv[-1]) + 1), kv_of_head=heads_kv - kv_lo, chunk_pos=chunk_pos,
        seq_len=seq_len, num_heads=num_heads, first_head=first_head,
        scale=ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(d), backend=inner.backend, group=group,
        rank=rank, shape=(b, s, r))
    return _RoutedAttention.apply(q, k, v, plan)
