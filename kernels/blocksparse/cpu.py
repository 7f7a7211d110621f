"""``cpu_sparse``: tile-level block-sparse attention on CPU, on the slice executor's tile plan.

The query × key space is cut into tiles of :data:`longreach.kernels.slices.plan.TILE` tokens; the mask's
tile classes pick the key tiles of each query tile: FULL tiles are gathered into one unmasked call per
query tile, PARTIAL tiles run with their own tile-sized pattern (or as causal when the pattern is an aligned
diagonal), EMPTY tiles are never touched; units of one shape run batched and are merged by LSE
(:mod:`longreach.kernels.slices.executor`). This is the path for masks without an analytic slice form; the
``slices`` backend runs the analytic plans. The backward pass reuses the same units with the *global*
out/lse, so it is exact for context parallelism too.

Same contract as :mod:`longreach.kernels.dense.reference`: q ``[B, Sq, H, D]``, k ``[B, Sk, Hkv, D]``,
v ``[B, Sk, Hkv, E]``; out ``[B, Sq, H, E]``; lse ``[B, H, Sq]`` float32 (float64 for float64 input),
rows with no allowed key out = 0, lse = −inf.
"""
from __future__ import annotations

from functools import partial

from ..slices import cpu as slices_cpu

__all__ = ["forward", "backward"]

#: ``forward(q, k, v, *, mask, scale) -> (out, lse)`` on the tile plan.
forward = partial(slices_cpu.forward, tiles=True)
#: ``backward(dout, q, k, v, out, lse, *, mask, scale) -> (dq, dk, dv)`` on the tile plan.
backward = partial(slices_cpu.backward, tiles=True)
