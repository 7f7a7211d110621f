"""Attention masks as data over *global* positions (framework/ARCHITECTURE.md, "The attention seam").

A :class:`Mask` answers, for a set of global query positions × key positions and a set of global
heads, which (query, key) pairs may attend. Because positions are global, a mask means the same on
every rank whatever the sequence layout. Three views are offered:

* ``dense(q_pos, k_pos, heads=..., num_heads=..., seq_len=...)`` — the elementwise pattern,
  ``bool [Hm, Sq, Sk]`` with ``Hm`` = 1 for head-independent masks, else ``len(heads)``;
* ``classify(...)`` — per head, whether the whole block is EMPTY, PARTIAL or FULL;
* ``block_map(..., block_q, block_k)`` — the same per tile, ``int8 [Hm, nQ, nK]``.

Classification may be conservative (PARTIAL where the truth is EMPTY or FULL): callers compute
PARTIAL blocks elementwise, so a conservative answer costs time, never correctness.

Factories are causal unless they say otherwise: ``sliding_window(w)`` keeps 0 ≤ i−j < w,
``sinks(n)`` keeps j < n and j ≤ i, ``documents(cu)`` keeps same-document j ≤ i.
Masks combine with ``&`` and ``|``. Random masks (SSA) read the training step and layer through
:meth:`Mask.at`, so every rank derives the same sample without communicating.
"""
from __future__ import annotations

from .algebra import EMPTY, FULL, PARTIAL, Mask, PlacedMask, causal, documents, full, place, sinks, sliding_window
from .patterns import power, s2, sf, ssa

# The slice planner's CPU executor builds a full mask from the class (kernels/slices/cpu.py); not public.
from .algebra import _Full  # noqa: F401, E402

__all__ = [
    "EMPTY",
    "PARTIAL",
    "FULL",
    "Mask",
    "PlacedMask",
    "place",
    "causal",
    "full",
    "sliding_window",
    "sinks",
    "documents",
    "power",
    "s2",
    "sf",
    "ssa",
]
