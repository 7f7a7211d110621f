"""Recurrent (token-by-token) lightning attention: the decode path.

Per head, λ = e^{−s}:  ``kv ← λ kv + k_tᵀ v_t``,  ``o_t = q_t kv``. Prefill with the chunked kernel
(``return_state=True``), then call :func:`decode_step` once per generated token: the outputs equal a
one-shot forward over the whole sequence.
"""
from __future__ import annotations

import torch

__all__ = ["decode_step", "lightning"]


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step.

    Args:
        q, k: ``[B, H, D]`` (or ``[B, 1, H, D]``); v: ``[B, H, E]`` (or ``[B, 1, H, E]``);
        decay: ``[H]``; state: ``[B, H, D, E]`` or None (zeros).

    Returns:
        ``(out``, same leading shape as ``v`` in q's dtype, ``new_state [B, H, D, E])`` in float32
        (float64 for float64 input).
    """
    squeeze = q.dim() == 4
    if squeeze:
        if q.shape[1] != 1:
            raise ValueError(f"decode_step takes one token, got q of shape {tuple(q.shape)}")
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = torch.exp(-decay.to(device=q.device, dtype=cdt))[None, :, None, None]  # [1, H, 1, 1]
    kv = torch.einsum("bhd,bhe->bhde", k.to(cdt), v.to(cdt))  # [B, H, D, E]
    state = kv if state is None else lam * state.to(cdt) + kv
    out = torch.einsum("bhd,bhde->bhe", q.to(cdt), state).to(q.dtype)  # [B, H, E]
    return (out[:, None] if squeeze else out), state


def lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
              initial_state: torch.Tensor | None = None, chunk_size: int | None = None,
              doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sequence by the recurrence (autograd through the loop; O(S·D·E), slow in Python).

    ``chunk_size`` is ignored; ``doc_ids`` ``[1 | B, S]`` (or None) zeroes the state where a document
    begins. Returns ``(out [B, S, H, E], state [B, H, D, E])``.
    """
    state = initial_state
    outs = []
    for t in range(q.shape[1]):
        if doc_ids is not None and t > 0 and state is not None:
            keep = (doc_ids[:, t] == doc_ids[:, t - 1]).to(state.dtype)[:, None, None, None]  # [1|B, 1, 1, 1]
            state = state * keep
        o, state = decode_step(q[:, t], k[:, t], v[:, t], decay, state)
        outs.append(o)
    if state is None:  # empty sequence is rejected by the caller; keep mypy honest
        raise ValueError("lightning attention needs at least one token")
    return torch.stack(outs, dim=1), state
