"""Quadratic reference for lightning (decayed causal linear) attention — the oracle.

    O = [(Q Kᵀ) ⊙ M] V,   M[h, i, j] = exp(−s_h (i − j)) for j ≤ i, else 0
    O_i += exp(−s_h (i + 1)) · q_i S0                       (initial state S0)
    S_end = exp(−s_h S) · S0 + Σ_j exp(−s_h (S − 1 − j)) · k_jᵀ v_j

No softmax and no 1/√d (TransNormerLLM / Lightning Attention). With packed documents every term is
kept only between tokens of one document (S0 counts as part of token 0's document). Materialises
``[B, H, S, S]``; runs in float64 when given float64 and in float32 otherwise. Gradients come from
autograd.
"""
from __future__ import annotations

import torch

__all__ = ["forward", "decay_matrix"]


def decay_matrix(decay: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``[H, n, n]`` matrix with exp(−s_h (i − j)) for j ≤ i and 0 above the diagonal."""
    idx = torch.arange(n, device=decay.device)
    dist = (idx[:, None] - idx[None, :]).to(dtype)  # [n, n]
    causal = dist >= 0
    # clamp the (masked) negative distances so exp never overflows before the where
    expo = -decay.to(dtype)[:, None, None] * dist.clamp(min=0)  # [H, n, n]
    return torch.where(causal, expo.exp(), torch.zeros((), dtype=dtype, device=decay.device))


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning attention by materialising the decayed causal score matrix.

    Args:
        q, k: ``[B, S, H, D]``; v: ``[B, S, H, E]``; decay: ``[H]`` rates s_h > 0.
        initial_state: ``[B, H, D, E]`` or None (zeros).
        doc_ids: ``[1 | B, S]`` document id per token, or None (one document).

    Returns:
        ``(out [B, S, H, E]`` in q's dtype, ``state [B, H, D, E])`` in the compute dtype
        (float64 for float64 input, else float32).
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, s, h, _ = q.shape
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    rate = decay.to(cdt)  # [H]
    m = decay_matrix(rate, s, cdt)[None]  # [1, H, S, S]
    pos = torch.arange(s, device=q.device, dtype=cdt)
    key_w = torch.exp(-rate[None, None, :] * (s - 1 - pos)[None, :, None])  # [1, S, H]
    q_w = torch.exp(-rate[None, None, :] * (pos + 1)[None, :, None])  # [1, S, H]
    s0_w = torch.exp(-rate * s)[None, :, None, None]  # [1, H, 1, 1]
    if doc_ids is not None:
        same = (doc_ids[:, :, None] == doc_ids[:, None, :]).to(cdt)  # [R, S, S]
        m = m * same[:, None]  # [R, H, S, S]
        key_w = key_w * (doc_ids == doc_ids[:, -1:]).to(cdt)[..., None]  # [R, S, H]: last document only
        q_w = q_w * (doc_ids == doc_ids[:, :1]).to(cdt)[..., None]  # [R, S, H]: S0 feeds the first document
        s0_w = s0_w * (doc_ids[:, 0] == doc_ids[:, -1]).to(cdt)[:, None, None, None]  # [R, H, 1, 1]
    scores = torch.einsum("bihd,bjhd->bhij", qf, kf) * m  # [B, H, S, S]
    out = torch.einsum("bhij,bjhe->bihe", scores, vf)  # [B, S, H, E]
    state = torch.einsum("bjhd,bjhe,bjh->bhde", kf, vf, key_w.expand(b, s, h))  # [B, H, D, E]
    if initial_state is not None:
        s0 = initial_state.to(cdt)  # [B, H, D, E]
        out = out + torch.einsum("bihd,bhde,bih->bihe", qf, s0, q_w.expand(b, s, h))
        state = state + s0_w * s0
    return out.to(q.dtype), state
