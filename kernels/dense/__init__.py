"""Dense softmax attention backends: ``reference`` (the oracle) and ``cpu`` (PyTorch's CPU flash kernel).

Each backend module offers the same functions (framework/ARCHITECTURE.md §2):

    forward(q, k, v, *, mask, scale) -> (out, lse)
    backward(dout, q, k, v, out, lse, *, mask, scale, grad_dtype=None) -> (dq, dk, dv)

``backward`` takes the *global* out and lse, which is what lets context parallelism compute each
block's gradients without keeping every partial result; ``grad_dtype=torch.float32`` returns float32
partial gradients of bf16 inputs (never rounded to bf16), for callers that sum several calls.
"""
from __future__ import annotations

import torch


def is_heads_major(x: torch.Tensor) -> bool:
    """Whether ``x`` ``[B, S, H, D]`` is stored heads-first: each head's ``[S, D]`` rows one dense block (a
    ``[B, H, S, D]`` tensor seen through a transpose, or a slice of its heads). A backend whose ``LAYOUT``
    is ``"heads"`` reads such tensors fastest."""
    _, s, h, d = x.shape
    return x.stride(3) == 1 and (s == 1 or x.stride(1) == d) and (h == 1 or x.stride(2) >= s * d)


def heads_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, S, H, D]`` with the same values and shape, stored heads-first (no copy if it already is,
    :func:`is_heads_major`)."""
    if is_heads_major(x):
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)
