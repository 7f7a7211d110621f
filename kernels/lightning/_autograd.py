"""One autograd wrapper for the lightning implementations that bring explicit forward/backward functions."""
from __future__ import annotations

from typing import Callable

import torch


def explicit_function(forward: Callable, backward: Callable, name: str) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` over ``forward(q, k, v, decay, s0, chunk)`` → ``(out, state)`` and
    ``backward(dout, dstate, q, k, v, decay, s0, chunk)`` → ``(dq, dk, dv, ds0)``; decay gets no gradient."""

    class _Lightning(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, decay, initial_state, chunk_size):
            ctx.set_materialize_grads(False)
            out, state = forward(q, k, v, decay, initial_state, chunk_size)
            ctx.save_for_backward(q, k, v, decay, initial_state)
            ctx.chunk_size = chunk_size
            return out, state

        @staticmethod
        def backward(ctx, dout, dstate):
            q, k, v, decay, s0 = ctx.saved_tensors
            if dout is None:  # only the final state was used
                dout = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=q.device)
            dq, dk, dv, ds0 = backward(dout, dstate, q, k, v, decay, s0, ctx.chunk_size)
            return dq, dk, dv, None, ds0, None

    _Lightning.__name__ = _Lightning.__qualname__ = name
    return _Lightning
