"""One autograd wrapper for the lightning implementations that bring explicit forward/backward functions."""
from __future__ import annotations

from typing import Callable

import torch


def explicit_function(forward: Callable, backward: Callable, name: str) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` over ``forward(q, k, v, decay, s0, chunk, doc_ids)`` → ``(out, state)`` and
    ``backward(dout, dstate, q, k, v, decay, s0, chunk, doc_ids)`` → ``(dq, dk, dv, ds0)``; decay and the
    document ids get no gradient."""

    class _Lightning(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, decay, initial_state, chunk_size, doc_ids):
            ctx.set_materialize_grads(False)
            out, state = forward(q, k, v, decay, initial_state, chunk_size, doc_ids)
            ctx.save_for_backward(q, k, v, decay, initial_state, doc_ids)
            ctx.chunk_size = chunk_size
            return out, state

        @staticmethod
        def backward(ctx, dout, dstate):
            q, k, v, decay, s0, doc_ids = ctx.saved_tensors
            if dout is None:  # only the final state was used
                dout = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=q.device)
            dq, dk, dv, ds0 = backward(dout, dstate, q, k, v, decay, s0, ctx.chunk_size, doc_ids)
            return dq, dk, dv, None, ds0, None, None

    _Lightning.__name__ = _Lightning.__qualname__ = name
    return _Lightning
