"""Softmax context parallelism: ring, Ulysses, hybrid (USP) and all-gather K/V, forward and backward.

The public entry point is :func:`cp_attention` (re-exported by ``longreach.parallel``).
"""
from .api import STRATEGIES, cp_attention, layout_positions

__all__ = ["STRATEGIES", "cp_attention", "layout_positions"]
