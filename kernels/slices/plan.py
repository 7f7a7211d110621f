"""Slice plans: a placed mask compiled to buckets of equal-shaped dense attention calls.

Compilation (once per (mask, shapes, positions, heads); plans are cached):

1. Local heads whose mask is the same list of :class:`~longreach.kernels._regions.Region` form one head
   group (S2: the un-shifted and the shifted half; SSA: one head each).
2. The local positions are cut into runs of consecutive global positions (contiguous layout: one run,
   zigzag: two). Each region ∩ (query run × key run) is *lowered* to items of three kinds: ``full``;
   ``causal`` — a square whose diagonal is aligned (top-left and bottom-right conventions agree);
   ``rcausal`` — the mirror image, run as causal on reversed rows and keys; ``band`` — :data:`BAND_ROWS`
   query rows over the keys of their window, run with one explicit ``[m, n]`` mask shared by every band
   unit of that width (the CPU kernel computes a causal triangle of ≤ 512 rows as a full square, so a band
   cut into triangles costs as much as this, and the shared mask needs no LSE merge). A band's first and
   last rows, where the window leaves the key range, are cut into query chunks of at most :data:`CHUNK`
   rows: a reversed-causal edge, a full middle and a causal diagonal.
3. Full items of one query range are coalesced (their keys gathered), then every item becomes a *unit*
   (row indices, key indices, heads); units of one (kind, m, n, heads) shape form a :class:`Bucket`.

Masks without an analytic form, or positions in many short runs (the stripe layout), fall back to tiles of
:data:`TILE` tokens: FULL tiles become full units, PARTIAL ones causal units when their pattern is an
aligned diagonal, else ``mask`` units carrying their own ``[Hd, m, n]`` pattern — never more than one
tile pair per unit.

A bucket whose units are equally spaced runs of rows and keys on one range of heads is *regular*
(:attr:`Bucket.regular`): the executor runs it on strided views of the inputs instead of gathered copies.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .._regions import Region, tighten
from ..blocksparse._plan import build_plan, head_groups
from ..masks import FULL, PARTIAL, PlacedMask

__all__ = ["BAND_ROWS", "CHUNK", "TILE", "Bucket", "PlanCache", "SlicePlan", "get_plan", "lower", "position_digest"]

#: Query rows per chunk of a band's edges (where the window leaves the key range).
CHUNK = 512
#: Query rows per band unit: each computes ``BAND_ROWS × (BAND_ROWS + width)`` scores for
#: ``BAND_ROWS × (width + 1)`` allowed ones; the CPU kernel runs units under 192 rows in 32-row blocks, so
#: fewer rows cost no kernel efficiency, only more (strided, copy-free) units.
BAND_ROWS = 64
#: Tile size of the fallback for masks without an analytic form.
TILE = 128
#: Plans kept per process.
CACHE_SIZE = 64

FULL_KIND, CAUSAL_KIND, RCAUSAL_KIND, MASK_KIND, BAND_KIND = "full", "causal", "rcausal", "mask", "band"


@dataclass(kw_only=True, slots=True)
class Bucket:
    """Units of one shape run as one batched call.

    Attributes:
        kind: ``full``, ``causal`` or ``mask``.
        rows: ``int64 [U, m]`` local query rows of each unit (reversed for mirrored units).
        heads: ``int64 [U, Hg]`` local query heads of each unit.
        keys: ``int64 [U, n]`` local key rows.
        kv_heads: ``int64 [U, Hk]`` local K/V heads (Hk divides Hg; Hk = Hg when K/V are expanded).
        mask: ``bool [U, Hd, m, n]`` for ``mask`` units (Hd 1 or Hg), ``[1, Hd, m, n]`` when every unit
            shares it (bands), else None.
        first: True when no earlier bucket wrote these (row, head) pairs (the result is stored, not merged).
        identity: the unit is the whole problem in order (run on the inputs without gathering).
        q_index: ``int64 [U·m·Hg]`` flat (row × H + head) index of every query cell, row-major per unit.
        k_index: ``int64 [U·n·Hk]`` flat (key × Hkv + K/V head) index of every key cell.
        regular: ``(row0, row_step, key0, key_step, head0, kv_head0)`` when unit u holds rows
            ``row0 + u·row_step + [0, m)``, keys ``key0 + u·key_step + [0, n)``, heads ``head0 + [0, Hg)`` and
            K/V heads ``kv_head0 + [0, Hk)``; None otherwise.
        q_block, k_block: ``q_index`` / ``k_index`` are runs of this many consecutive cells, each starting at a
            multiple of it (gathered a block at a time).
        split: regular buckets of this one's units, one per head group (what runs on strided views), or None.
        window: for band units (the shared mask is :func:`band_mask`), the same pattern as flash-attn's
            ``window_size`` (left, right) about the bottom-right diagonal; None otherwise.
    """

    kind: str
    rows: torch.Tensor
    heads: torch.Tensor
    keys: torch.Tensor
    kv_heads: torch.Tensor
    mask: torch.Tensor | None = None
    first: bool = False
    identity: bool = False
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    regular: tuple[int, int, int, int, int, int] | None = None
    q_block: int = 1
    k_block: int = 1
    split: list[Bucket] | None = None
    window: tuple[int, int] | None = None
    _copies: dict = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(q_index, k_index, mask) on ``device``, copied once per device."""
        if device.type == "cpu":
            return self.q_index, self.k_index, self.mask
        if device not in self._copies:
            self._copies[device] = tuple(None if t is None else t.to(device)
                                         for t in (self.q_index, self.k_index, self.mask))
        return self._copies[device]


@dataclass(kw_only=True, slots=True)
class SlicePlan:
    """Buckets of one attention call, in execution order; ``fallback`` when tiles were used."""

    buckets: list[Bucket] = field(default_factory=list)
    fallback: bool = False

    def score_elements(self) -> int:
        """Allowed score elements the plan covers per batch row (causal units count their lower triangle,
        mask units their allowed entries)."""
        total = 0
        for b in self.buckets:
            u, m = b.rows.shape
            n, hg = b.keys.shape[1], b.heads.shape[1]
            if b.mask is not None:
                total += int(b.mask.expand(u, hg, m, n).sum())
                continue
            per = m * (m + 1) // 2 if b.kind == CAUSAL_KIND else m * n
            total += u * hg * per
        return total

    def calls(self) -> int:
        return len(self.buckets)

    def runs(self) -> int:
        """Kernel calls at batch size 1 (a split bucket runs once per part)."""
        return sum(len(b.split) if b.split else 1 for b in self.buckets)


# --------------------------------------------------------------------------------------------
# Lowering regions to items (global positions)
# --------------------------------------------------------------------------------------------

Item = tuple[int, int, int, int, str]  # (q0, q1, k0, k1, kind)


def _lower_lo(q0: int, q1: int, k0: int, k1: int, dlo: int) -> list[Item]:
    """Rectangle with only ``k ≤ q − dlo``: keys before the first query's diagonal are full; the rest is a
    square causal diagonal plus a full block for the rows below it."""
    p, m = q0 - dlo, q1 - q0
    out: list[Item] = []
    if k0 < p:
        out.append((q0, q1, k0, min(k1, p), FULL_KIND))
    ds, de = max(k0, p), min(k1, p + m)
    if ds < de:
        t, n = ds - p, de - ds
        out.append((q0 + t, q0 + t + n, ds, de, CAUSAL_KIND))
        if q0 + t + n < q1:
            out.append((q0 + t + n, q1, ds, de, FULL_KIND))
    return out


def lower(r: Region | None, chunk: int = CHUNK, by_keys: bool = False) -> list[Item]:
    """Items ``(q0, q1, k0, k1, kind)`` whose union is exactly the (tightened) region ``r``, disjoint.

    ``by_keys`` cuts a band's interior into units of keys (each with the queries that see them) instead of
    units of queries: what a backward wants, since the kernel returns one gradient per unit row and key and
    overlapping units' gradients are summed (for query units dK and dV overlap, for key units only dQ).
    """
    r = None if r is None else tighten(r)
    if r is None:
        return []
    q0, q1, k0, k1, dlo, dhi = r
    lo, hi = dlo > q0 - (k1 - 1), dhi < (q1 - 1) - k0  # which diagonal bounds cut the rectangle
    if not lo and not hi:
        return [(q0, q1, k0, k1, FULL_KIND)]
    if lo and not hi:
        return _lower_lo(q0, q1, k0, k1, dlo)
    if hi and not lo:
        # mirror x -> -x: q − k ≤ dhi becomes k' ≤ q' + dhi, a lower bound; map the items back reversed
        mirrored = _lower_lo(1 - q1, 1 - q0, 1 - k1, 1 - k0, -dhi)
        return [(1 - b, 1 - a, 1 - d, 1 - c, RCAUSAL_KIND if kind == CAUSAL_KIND else kind)
                for a, b, c, d, kind in mirrored]
    if dhi == dlo:  # one diagonal: each query sees one key
        return [(q, q + 1, q - dlo, q - dlo + 1, FULL_KIND) for q in range(q0, q1) if k0 <= q - dlo < k1]
    # interior: whole windows inside [k0, k1), in band units of BAND_ROWS rows (fewer for narrow bands,
    # whose units would mostly compute masked scores)
    rows = min(BAND_ROWS, max(16, dhi - dlo))
    if by_keys:
        ka, kb = max(k0, q0 - dlo), min(k1, q1 - dhi)
        if kb - ka >= rows:  # key units of `rows` keys, the last one shorter
            out = [(a + dlo, min(a + rows, kb) + dhi, a, min(a + rows, kb), BAND_KIND) for a in range(ka, kb, rows)]
            for a, b in ((k0, ka), (kb, k1)):
                out += lower(Region(q0, q1, a, b, dlo, dhi), chunk, by_keys)
            return out
    else:
        ia, ib = max(q0, k0 + dhi), min(q1, k1 + dlo)
        if ib - ia >= rows:  # query units of `rows` rows, the last one shorter
            out = [(a, min(a + rows, ib), a - dhi, min(a + rows, ib) - dlo, BAND_KIND) for a in range(ia, ib, rows)]
            for a, b in ((q0, ia), (ib, q1)):
                out += lower(Region(a, b, k0, k1, dlo, dhi), chunk, by_keys)
            return out
    c = max(1, min(chunk, dhi - dlo))
    out = []
    for a in range(q0, q1, c):
        b = min(q1, a + c)
        # edge keys (only k ≥ q − dhi binds), middle (nothing binds), diagonal (only k ≤ q − dlo binds)
        for ka, kb in ((a - dhi, a + c - dhi), (a + c - dhi, a - dlo), (a - dlo, a + c - dlo)):
            out += lower(Region(a, b, max(k0, ka), min(k1, kb), dlo, dhi), chunk, by_keys)
    return out


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def band_mask(m: int, n: int) -> torch.Tensor:
    """``bool [1, m, n]`` of a band unit: with m < n (query unit) row r sees keys r … r + n − m (its window);
    with m > n (key unit) key j is seen by rows j … j + m − n."""
    r, j = torch.arange(m)[:, None], torch.arange(n)[None, :]
    offset = j - r if m < n else r - j
    return ((offset >= 0) & (offset <= abs(n - m)))[None]


def _runs(pos: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive positions: ``[(local start, first position, length)]``."""
    n = pos.numel()
    if n == 0:
        return []
    breaks = ((pos[1:] - pos[:-1]) != 1).nonzero().reshape(-1) + 1
    starts = [0, *breaks.tolist()]
    ends = [*starts[1:], n]
    first = pos[torch.tensor(starts)].tolist()
    return [(s, p, e - s) for s, p, e in zip(starts, first, ends)]


def _contiguous(idx: torch.Tensor) -> bool:
    return idx.numel() > 0 and bool((idx[1:] - idx[:-1] == 1).all())


@lru_cache(maxsize=16)
def causal_mask(m: int, n: int) -> torch.Tensor:
    """``bool [1, m, n]``: row r sees keys ≤ r + n − m (causal, bottom-right aligned: full keys, then a
    diagonal)."""
    return (torch.arange(n)[None, :] <= torch.arange(m)[:, None] + (n - m))[None]


class _Units:
    """Collects units per head group, coalescing full units of one query range; full keys that end where a
    causal unit of the same rows begins join it as one ``mask`` unit (PowerAttention's nearest blocks)."""

    def __init__(self, h: int, hkv: int, coalesce: bool = True) -> None:
        self.h, self.hkv, self.rep, self.coalesce = h, hkv, h // hkv, coalesce
        self.full: dict[tuple, list[torch.Tensor]] = {}
        self.other: list[tuple] = []

    def kv_of(self, heads: tuple[int, ...]) -> tuple[int, ...]:
        kv = sorted({x // self.rep for x in heads})
        whole_groups = [g * self.rep + i for g in kv for i in range(self.rep)]
        complete = len(heads) == len(kv) * self.rep and list(heads) == whole_groups
        return tuple(kv) if complete else tuple(x // self.rep for x in heads)

    def add(self, heads: tuple[int, ...], rows: torch.Tensor, keys: torch.Tensor, kind: str,
            mask: torch.Tensor | None = None) -> None:
        if kind == FULL_KIND and mask is None:
            key = (heads, rows[0].item(), rows[-1].item(), rows.numel())
            self.full.setdefault(key, [rows]).append(keys)
        else:
            self.other.append((heads, rows, keys, kind, mask))

    def _fold(self, heads, rows: torch.Tensor, keys: torch.Tensor) -> tuple | None:
        """The causal unit (rows, keys) with the full keys of its rows that run contiguously up to its first
        key, as one bottom-right causal mask unit; None when there are none."""
        pieces = self.full.get((heads, rows[0].item(), rows[-1].item(), rows.numel()))
        if pieces is None or not (_contiguous(rows) and _contiguous(keys)):
            return None
        chain, start = [], int(keys[0])
        while True:
            hit = next((i for i, p in enumerate(pieces[1:], 1) if int(p[-1]) == start - 1 and _contiguous(p)), None)
            if hit is None:
                break
            chain.insert(0, pieces.pop(hit))
            start = int(chain[0][0])
        if not chain:
            return None
        keys = torch.cat([*chain, keys])
        return heads, rows, keys, MASK_KIND, causal_mask(rows.numel(), keys.numel())

    def units(self):
        other = []
        for heads, rows, keys, kind, mask in self.other:
            folded = self._fold(heads, rows, keys) if kind == CAUSAL_KIND and mask is None else None
            other.append(folded or (heads, rows, keys, kind, mask))
        for (heads, *_), (rows, *keys) in self.full.items():
            if keys and self.coalesce:
                yield heads, rows, torch.cat(keys), FULL_KIND, None
            for piece in [] if self.coalesce else keys:
                yield heads, rows, piece, FULL_KIND, None
        yield from other


def _local(run: tuple[int, int, int], a: int, b: int, reverse: bool) -> torch.Tensor:
    idx = torch.arange(run[0] + a - run[1], run[0] + b - run[1])
    return idx.flip(0) if reverse else idx


def _region_units(units: _Units, heads: tuple[int, ...], regions: list[Region], q_runs, k_runs,
                  by_keys: bool = False) -> None:
    for rq in q_runs:
        for rk in k_runs:
            box = Region(rq[1], rq[1] + rq[2], rk[1], rk[1] + rk[2])
            for reg in regions:
                for q0, q1, k0, k1, kind in lower(Region(max(box.q0, reg.q0), min(box.q1, reg.q1),
                                                         max(box.k0, reg.k0), min(box.k1, reg.k1),
                                                         reg.dlo, reg.dhi), by_keys=by_keys):
                    rev = kind == RCAUSAL_KIND
                    if kind == BAND_KIND:
                        units.add(heads, _local(rq, q0, q1, False), _local(rk, k0, k1, False), MASK_KIND,
                                  band_mask(q1 - q0, k1 - k0))
                        continue
                    units.add(heads, _local(rq, q0, q1, rev), _local(rk, k0, k1, rev),
                              CAUSAL_KIND if rev else kind)


def _tile_units(units: _Units, placed: PlacedMask, sq: int, sk: int, h: int) -> None:
    tile = TILE
    plan = build_plan(placed, sq, sk, h, tile, tile, with_partial=False)
    gheads, nh = placed._heads(h)
    for head_idx, kind in head_groups(plan.kind, h):
        heads = tuple(range(h)) if head_idx is None else tuple(head_idx.tolist())
        sub = placed if head_idx is None else PlacedMask(placed.mask, placed.q_pos, placed.k_pos, placed.seq_len,
                                                         gheads[head_idx], nh)
        for i in range(kind.shape[0]):
            rows = torch.arange(i * tile, min(sq, (i + 1) * tile))
            full = (kind[i] == FULL).nonzero().reshape(-1)
            if full.numel():
                keys = torch.cat([torch.arange(t * tile, min(sk, (t + 1) * tile)) for t in full.tolist()])
                units.add(heads, rows, keys, FULL_KIND)
            for t in (kind[i] == PARTIAL).nonzero().reshape(-1).tolist():
                keys = torch.arange(t * tile, min(sk, (t + 1) * tile))
                dense = sub.slice(rows, keys).dense(len(heads))  # [Hd, m, n]: one tile pair at most
                m, n = dense.shape[1:]
                tril = torch.ones(m, n, dtype=torch.bool).tril()
                if m == n and bool((dense == tril).all()):
                    units.add(heads, rows, keys, CAUSAL_KIND)
                else:
                    units.add(heads, rows, keys, MASK_KIND, dense)


def _buckets(units: _Units, sq: int, sk: int, h: int, shared_rows: bool = False) -> list[Bucket]:
    groups: dict[tuple, list[tuple]] = {}
    for heads, rows, keys, kind, mask in units.units():
        kv = units.kv_of(heads)
        groups.setdefault((kind, rows.numel(), keys.numel(), len(heads), len(kv)), []).append(
            (rows, torch.tensor(heads), keys, torch.tensor(kv), mask))
    covered = torch.zeros(sq, h, dtype=torch.bool)
    out = []
    for (kind, m, n, hg, hk), members in groups.items():
        # units sharing a (row, head) pair cannot be written in one scatter: split them
        parts: list[list[tuple]] = []
        seen: list[torch.Tensor] = []
        for u in members:
            cells = torch.zeros(sq, h, dtype=torch.bool)
            cells[u[0][:, None], u[1][None, :]] = True
            for part, s in zip(parts, seen):
                if shared_rows or not bool((s & cells).any()):
                    part.append(u)
                    s |= cells
                    break
            else:
                parts.append([u])
                seen.append(cells)
        for part, cells in zip(parts, seen):
            b = _bucket(kind, part, h, units.hkv, first=not bool((covered & cells).any()))
            if b.regular is None:  # S2's two head groups, PowerAttention's distances: regular per group
                by_offset: dict[tuple, list[tuple]] = {}
                for u in part:
                    by_offset.setdefault((tuple(u[1].tolist()), int(u[2][0]) - int(u[0][0])), []).append(u)
                split = [_bucket(kind, x, h, units.hkv, first=b.first) for x in by_offset.values()]
                if len(split) > 1 and all(x.regular is not None for x in split):
                    b.split = split
            b.identity = (len(part) == 1 and m == sq and n == sk and hg == h and kind != MASK_KIND
                          and torch.equal(b.rows[0], torch.arange(sq)) and torch.equal(b.keys[0], torch.arange(sk))
                          and torch.equal(b.heads[0], torch.arange(h)) and hk == h // units.rep)
            covered |= cells
            out.append(b)
    if len(out) > 1:  # the inputs themselves only stand in for a plan of one unit
        for b in out:
            b.identity = False
    return out


def _bucket(kind: str, part: list[tuple], h: int, hkv: int, *, first: bool) -> Bucket:
    """A bucket of units ``(rows, heads, keys, kv_heads, mask)`` with its cell indices."""
    masks = [u[4] for u in part]
    mask = None
    if kind == MASK_KIND and all(x is masks[0] for x in masks):
        mask = masks[0][None]  # [1, Hd, m, n] shared by every unit
    elif kind == MASK_KIND:
        hd = max(x.shape[0] for x in masks)
        mask = torch.stack([x.expand(hd, -1, -1) for x in masks])  # [U, Hd, m, n]
    b = Bucket(kind=kind, rows=torch.stack([u[0] for u in part]), heads=torch.stack([u[1] for u in part]),
               keys=torch.stack([u[2] for u in part]), kv_heads=torch.stack([u[3] for u in part]), mask=mask,
               first=first)
    b.q_index = (b.rows[:, :, None] * h + b.heads[:, None, :]).reshape(-1)
    b.k_index = (b.keys[:, :, None] * hkv + b.kv_heads[:, None, :]).reshape(-1)
    b.regular = _regular(b)
    b.q_block, b.k_block = _block(b.q_index), _block(b.k_index)
    m, n = b.rows.shape[1], b.keys.shape[1]
    if mask is not None and mask.shape[0] == 1 and masks[0] is band_mask(m, n):
        b.window = (max(n - m, 0), max(m - n, 0))  # query unit: keys r … r + n − m; key unit: rows j … j + m − n
    return b


def _block(index: torch.Tensor) -> int:
    """The largest L such that ``index`` is made of runs ``[cL, cL + L)``."""
    if index.numel() == 0:
        return 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), ((index[1:] - index[:-1]) != 1).nonzero().reshape(-1) + 1])
    lengths = torch.diff(starts, append=torch.tensor([index.numel()]))
    return max(1, math.gcd(*index[starts].tolist(), *lengths.tolist()))


def _progression(idx: torch.Tensor) -> tuple[int, int] | None:
    """``(start, step)`` when row u of ``idx [U, m]`` is ``start + u·step + [0, m)`` (step ≥ 0), else None."""
    u, m = idx.shape
    start = int(idx[0, 0])
    step = int(idx[1, 0]) - start if u > 1 else 0
    if step < 0:
        return None
    expect = start + step * torch.arange(u)[:, None] + torch.arange(m)[None, :]
    return (start, step) if torch.equal(idx, expect) else None


def _regular(b: Bucket) -> tuple[int, int, int, int, int, int] | None:
    parts = [_progression(x) for x in (b.rows, b.keys, b.heads, b.kv_heads)]
    if any(p is None for p in parts) or parts[2][1] or parts[3][1]:  # heads must be the same for every unit
        return None
    (r0, rs), (k0, ks), (h0, _), (kh0, _) = parts
    return r0, rs, k0, ks, h0, kh0


def _head_regions(placed: PlacedMask, h: int) -> dict[tuple, list[int]] | None:
    """Local heads grouped by their region list (None when the mask has no analytic form)."""
    gheads, nh = placed._heads(h)
    groups: dict[tuple, list[int]] = {}
    cache: dict[int, tuple] = {}
    for i, g in enumerate(gheads.tolist()):
        key = g if placed.mask.per_head else 0
        if key not in cache:
            regs = placed.mask.regions(int(g), int(nh), int(placed.seq_len))
            if regs is None:
                return None
            cache[key] = tuple(regs)
        groups.setdefault(cache[key], []).append(i)
    return groups


def build(placed: PlacedMask, sq: int, sk: int, h: int, hkv: int, *, tiles: bool = False,
          backward: bool = False) -> SlicePlan:
    """Compile ``placed`` for ``sq`` queries × ``sk`` keys, ``h`` local query heads over ``hkv`` K/V heads.

    ``tiles`` forces the tile plan (what the ``cpu_sparse`` backend runs). ``backward`` builds the plan of
    the gradients: bands in key units, full key ranges of one query range not gathered into one unit, and
    units of one bucket may share query rows (their gradients are added, never stored).
    """
    q_runs, k_runs = _runs(placed.q_pos), _runs(placed.k_pos)
    too_many_runs = len(q_runs) * len(k_runs) > 64 and (len(q_runs) > sq // 64 or len(k_runs) > sk // 64)
    groups = None if (tiles or too_many_runs) else _head_regions(placed, h)

    def compile_units(coalesce: bool) -> SlicePlan:
        units = _Units(h, hkv, coalesce=coalesce)
        if groups is None:
            _tile_units(units, placed, sq, sk, h)
        else:
            for regions, heads in groups.items():
                _region_units(units, tuple(heads), list(regions), q_runs, k_runs, by_keys=backward)
        return SlicePlan(buckets=_buckets(units, sq, sk, h, shared_rows=backward), fallback=groups is None)

    plan = compile_units(coalesce=True)
    if backward and groups is not None:
        # gradients need no merge: full key ranges left apart run as regular (copy-free) buckets when they
        # all are (PowerAttention's distances); else one gathered call per query range is cheaper (SSA)
        pieces = compile_units(coalesce=False)
        if all(b.regular is not None or b.split for b in pieces.buckets if b.kind == FULL_KIND):
            plan = pieces
    return plan


class PlanCache:
    """Plans keyed by (mask pattern, shapes, positions, …), least recently used dropped past ``size``.

    The key holds a digest of the positions; a hit is confirmed against the stored positions themselves.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, object]] = OrderedDict()

    def get(self, placed: PlacedMask, key: tuple, build):
        q_pos, k_pos = placed.q_pos.cpu(), placed.k_pos.cpu()
        key = (placed.mask.key(), None if placed.heads is None else tuple(placed.heads.tolist()), placed.num_heads,
               int(placed.seq_len), position_digest(q_pos), position_digest(k_pos), *key)
        hit = self.entries.get(key)
        if hit is not None and torch.equal(hit[0], q_pos) and torch.equal(hit[1], k_pos):
            self.entries.move_to_end(key)
            return hit[2]
        plan = build()
        self.entries[key] = (q_pos.clone(), k_pos.clone(), plan)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return plan

    def clear(self) -> None:
        self.entries.clear()


def position_digest(pos: torch.Tensor) -> tuple[int, str]:
    """A cache key for a positions tensor (its length and a hash of its values)."""
    data = pos.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return pos.numel(), hashlib.blake2b(data, digest_size=16).hexdigest()


_CACHE = PlanCache(CACHE_SIZE)


def get_plan(placed: PlacedMask, sq: int, sk: int, h: int, hkv: int, *, tiles: bool = False,
             backward: bool = False) -> SlicePlan:
    """The cached plan for (mask, shapes, heads, positions); built on first use (see :func:`build`)."""
    return _CACHE.get(placed, (sq, sk, h, hkv, TILE, CHUNK, BAND_ROWS, tiles, backward),
                      lambda: build(placed, sq, sk, h, hkv, tiles=tiles, backward=backward))


def clear_cache() -> None:
    _CACHE.clear()
