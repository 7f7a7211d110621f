"""Masks as unions of disjoint regions: the exact, analytic form the slice planner compiles.

A :class:`Region` is the set of (query position q, key position k) pairs with ``q0 ≤ q < q1``,
``k0 ≤ k < k1`` and ``dlo ≤ q − k ≤ dhi`` (global positions; ``±INF`` for an absent bound). Causal is one
region (``dlo = 0``), a sliding window one more bound (``dhi = w − 1``), a document or an S2 group one
region each. A mask that can describe itself per head as a list of *disjoint* regions answers
:meth:`~longreach.kernels.masks.Mask.regions`; ``&`` intersects region lists pairwise and ``|`` adds the
set difference of the second list, so combinations stay exact and disjoint (what the float32 LSE merge
of their partial results needs).
"""
from __future__ import annotations

from typing import NamedTuple

INF = 1 << 62

#: Region lists longer than this are not worth compiling (callers fall back to tiles).
MAX_REGIONS = 20000


class Region(NamedTuple):
    """Pairs with q in [q0, q1), k in [k0, k1) and q − k in [dlo, dhi] (global positions)."""

    q0: int
    q1: int
    k0: int
    k1: int
    dlo: int = -INF
    dhi: int = INF


def tighten(r: Region) -> Region | None:
    """The same pair set with bounds that bind, or None when it is empty."""
    q0, q1, k0, k1, dlo, dhi = r
    for _ in range(2):
        if q0 >= q1 or k0 >= k1:
            return None
        dlo, dhi = max(dlo, q0 - (k1 - 1)), min(dhi, (q1 - 1) - k0)
        if dlo > dhi:
            return None
        # q − k ≥ dlo ⇒ q ≥ k0 + dlo and k ≤ q1 − 1 − dlo;
        # q − k ≤ dhi ⇒ q ≤ k1 − 1 + dhi and k ≥ q0 − dhi
        q0, q1 = max(q0, k0 + dlo), min(q1, k1 + dhi)
        k0, k1 = max(k0, q0 - dhi), min(k1, q1 - dlo)
    if q0 >= q1 or k0 >= k1:
        return None
    dlo, dhi = max(dlo, q0 - (k1 - 1)), min(dhi, (q1 - 1) - k0)
    return None if dlo > dhi else Region(q0, q1, k0, k1, dlo, dhi)


def intersect(a: Region, b: Region) -> Region | None:
    return tighten(Region(max(a.q0, b.q0), min(a.q1, b.q1), max(a.k0, b.k0), min(a.k1, b.k1),
                          max(a.dlo, b.dlo), min(a.dhi, b.dhi)))


def difference(a: Region, b: Region) -> list[Region]:
    """``a \\ b`` as disjoint regions: outside b's query range, else outside its key range, else
    outside its diagonal band (six pieces at most)."""
    if intersect(a, b) is None:
        return [a]
    pieces = (
        Region(-INF, b.q0, -INF, INF), Region(b.q1, INF, -INF, INF),
        Region(b.q0, b.q1, -INF, b.k0), Region(b.q0, b.q1, b.k1, INF),
        Region(b.q0, b.q1, b.k0, b.k1, -INF, b.dlo - 1), Region(b.q0, b.q1, b.k0, b.k1, b.dhi + 1, INF),
    )
    return [r for p in pieces if (r := intersect(a, p)) is not None]


def intersect_lists(a: list[Region], b: list[Region]) -> list[Region] | None:
    out = [r for x in a for y in b if (r := intersect(x, y)) is not None]
    return out if len(out) <= MAX_REGIONS else None


def union_lists(a: list[Region], b: list[Region]) -> list[Region] | None:
    """Disjoint union: ``a`` plus the parts of ``b`` outside every region of ``a``."""
    out = list(a)
    for y in b:
        rest = [y]
        for x in a:
            rest = [p for r in rest for p in difference(r, x)]
            if len(rest) > MAX_REGIONS:
                return None
        out.extend(rest)
        if len(out) > MAX_REGIONS:
            return None
    return out
