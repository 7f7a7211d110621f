"""Chunked lightning attention in PyTorch (Lightning Attention-2), explicit forward and backward.

The sequence is cut into blocks of ``C`` tokens (the last one may be shorter). Per head, λ = e^{−s}:

* intra-block: ``[(Q_t K_tᵀ) ⊙ D] V_t`` with ``D[i, j] = λ^{i−j}`` (j ≤ i), all blocks at once;
* inter-block: ``diag(λ^{i+1}) Q_t KV_t`` with KV_t the ``[D, E]`` state entering block t;
* state scan: ``KV_{t+1} = λ^{n_t} KV_t + (diag(λ^{n_t−1−j}) K_t)ᵀ V_t`` with n_t the block's real
  length (so a ragged last block gives the exact final state).

Backward: the intra terms for every block in parallel; the inter terms from a forward scan of the
states (dQ) and a reverse scan of their gradients (dK, dV, d(initial state)). States are recomputed in
backward rather than stored (they are ``S/C × D × E`` per head). Everything runs in float32 (float64
for float64 input); decays are never inverted (no λ^{−j}), so nothing overflows for large s·C.

Packed documents multiply the decay weights by the 0/1 factors of :mod:`.documents` (same document
inside a block; entering state → queries of the block's first document; keys of its last document →
leaving state; state across the block only when no document begins in it); the scans are unchanged.
"""
from __future__ import annotations

import torch

from ._autograd import explicit_function
from .naive import decay_matrix

__all__ = ["DEFAULT_CHUNK", "forward", "backward", "lightning"]

DEFAULT_CHUNK = 64


def _blocks(x: torch.Tensor, c: int) -> torch.Tensor:
    """``[B, S, H, X]`` → zero-padded, head-major ``[B, H, NB, C, X]`` (batched matmuls over blocks)."""
    b, s, h, d = x.shape
    nb = -(-s // c)
    pad = nb * c - s
    if pad:
        x = torch.cat([x, x.new_zeros(b, pad, h, d)], dim=1)
    return x.view(b, nb, c, h, d).permute(0, 3, 1, 2, 4).contiguous()


def _unblock(x: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, NB, C, X]`` → ``[B, S, H, X]`` (padding dropped)."""
    b, h, nb, c, d = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(b, nb * c, h, d)[:, :s].to(dtype)


def _weights(rate: torch.Tensor, s: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay factors for blocks of ``c`` over a sequence of ``s`` tokens, shaped for ``[B, H, NB, C, X]``.

    Returns:
        q_w ``[1, H, 1, C, 1]``: λ^{i+1} (query i's weight on the entering state);
        k_w ``[1, H, NB, C, 1]``: λ^{n_t−1−j} for j < n_t, 0 on padding (key j's weight in the block state);
        block_w ``[1, H, NB, 1, 1]``: λ^{n_t}, the decay across block t.
    """
    nb = -(-s // c)
    lens = torch.full((nb,), c, device=rate.device, dtype=rate.dtype)
    lens[-1] = s - (nb - 1) * c
    j = torch.arange(c, device=rate.device, dtype=rate.dtype)
    r = rate[:, None, None]  # [H, 1, 1]
    q_w = torch.exp(-r * (j + 1)[None, None, :])  # [H, 1, C]
    gap = lens[:, None] - 1 - j[None, :]  # [NB, C]
    k_w = torch.where(gap >= 0, torch.exp(-r * gap.clamp(min=0)), torch.zeros((), dtype=rate.dtype, device=rate.device))
    block_w = torch.exp(-r * lens[None, :, None])  # [H, NB, 1]
    return q_w[None, ..., None], k_w[None, ..., None], block_w[None, ..., None]


def _document_factors(doc_ids: torch.Tensor, s: int, c: int, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """0/1 document factors for blocks of ``c``, shaped for ``[B, H, NB, C, X]`` (R = 1 or B rows).

    Returns:
        same ``[R, 1, NB, C, C]`` (query and key in one document), q_keep ``[R, 1, NB, C, 1]`` (query in
        the document of the entering state), k_keep ``[R, 1, NB, C, 1]`` (key in the block's last
        document), carry ``[R, 1, NB, 1, 1]`` (no document begins inside the block).
    """
    nb = -(-s // c)
    r = doc_ids.shape[0]
    ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(r, nb * c - s)], dim=1).view(r, nb, c)  # [R, NB, C]
    starts = torch.arange(nb, device=doc_ids.device) * c
    prev = doc_ids[:, (starts - 1).clamp(min=0)]  # [R, NB]: token before each block (token 0 for block 0)
    last = doc_ids[:, (starts + c - 1).clamp(max=s - 1)]  # [R, NB]: last real token of each block
    same = (ids[..., :, None] == ids[..., None, :]).to(dtype)[:, None]
    q_keep = (ids == prev[..., None]).to(dtype)[:, None, ..., None]
    k_keep = (ids == last[..., None]).to(dtype)[:, None, ..., None]
    carry = (prev == last).to(dtype)[:, None, :, None, None]
    return same, q_keep, k_keep, carry


def _block_weights(rate: torch.Tensor, s: int, c: int, doc_ids: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dmat, q_w, k_w, block_w)`` of :func:`_weights` with the intra-block decay matrix
    ``[1, H, 1, C, C]``, each multiplied by the document factors when ``doc_ids`` is given."""
    dmat = decay_matrix(rate, c, rate.dtype)[None, :, None]  # [1, H, 1, C, C]
    q_w, k_w, block_w = _weights(rate, s, c)
    if doc_ids is None:
        return dmat, q_w, k_w, block_w
    same, q_keep, k_keep, carry = _document_factors(doc_ids, s, c, rate.dtype)
    return dmat * same, q_w * q_keep, k_w * k_keep, block_w * carry  # [R, H, NB, …]


def _entering_states(kvb: torch.Tensor, block_w: torch.Tensor, s0: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward scan: states entering each block ``[B, H, NB, D, E]`` and the final state ``[B, H, D, E]``."""
    b, h, nb, d, e = kvb.shape
    kv = kvb.new_zeros(b, h, d, e) if s0 is None else s0
    states = torch.empty_like(kvb)
    for t in range(nb):
        states[:, :, t] = kv
        kv = block_w[:, :, t] * kv + kvb[:, :, t]
    return states, kv


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
            initial_state: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK,
            doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked forward.

    Args:
        q, k: ``[B, S, H, D]``; v: ``[B, S, H, E]``; decay: ``[H]``; initial_state: ``[B, H, D, E]`` or None.
        chunk_size: block length C.
        doc_ids: ``[1 | B, S]`` document id per token, or None (one document).

    Returns:
        ``(out [B, S, H, E]`` in q's dtype, ``state [B, H, D, E]`` float32/float64).
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = q.shape[1]
    c = min(chunk_size, s)
    rate = decay.to(device=q.device, dtype=cdt)  # [H]
    qb, kb, vb = (_blocks(x.to(cdt), c) for x in (q, k, v))  # [B, H, NB, C, *]
    dmat, q_w, k_w, block_w = _block_weights(rate, s, c, doc_ids)
    out = ((qb @ kb.transpose(-1, -2)) * dmat) @ vb  # [B, H, NB, C, E]
    kvb = (kb * k_w).transpose(-1, -2) @ vb  # [B, H, NB, D, E]
    s0 = None if initial_state is None else initial_state.to(cdt)
    states, final = _entering_states(kvb, block_w, s0)  # [B, H, NB, D, E], [B, H, D, E]
    out = out + (qb * q_w) @ states
    return _unblock(out, s, q.dtype), final


def backward(dout: torch.Tensor, dstate: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, decay: torch.Tensor, initial_state: torch.Tensor | None = None,
             chunk_size: int = DEFAULT_CHUNK, doc_ids: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``forward`` given ``dout [B, S, H, E]`` and ``dstate [B, H, D, E]`` (or None).

    Returns:
        ``(dq, dk, dv, d_initial_state)`` in the inputs' dtypes (the last None without an initial state).
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = q.shape[1]
    c = min(chunk_size, s)
    rate = decay.to(device=q.device, dtype=cdt)
    qb, kb, vb, dob = (_blocks(x.to(cdt), c) for x in (q, k, v, dout))  # [B, H, NB, C, *]
    dmat, q_w, k_w, block_w = _block_weights(rate, s, c, doc_ids)
    # intra-block terms, every block at once
    ds = (dob @ vb.transpose(-1, -2)) * dmat  # [B, H, NB, C, C]
    sc = (qb @ kb.transpose(-1, -2)) * dmat  # [B, H, NB, C, C]
    dq = ds @ kb  # [B, H, NB, C, D]
    dk = ds.transpose(-1, -2) @ qb
    dv = sc.transpose(-1, -2) @ dob  # [B, H, NB, C, E]
    # dQ: forward scan of the states entering each block
    kvb = (kb * k_w).transpose(-1, -2) @ vb  # [B, H, NB, D, E]
    s0 = None if initial_state is None else initial_state.to(cdt)
    states, _ = _entering_states(kvb, block_w, s0)
    dq = dq + (dob * q_w) @ states.transpose(-1, -2)
    # dK, dV: reverse scan of G_t, the gradient of the state leaving block t
    a = (qb * q_w).transpose(-1, -2) @ dob  # [B, H, NB, D, E]
    nb = qb.shape[2]
    g = torch.zeros_like(a[:, :, 0]) if dstate is None else dstate.to(cdt)
    leaving = torch.empty_like(a)
    for t in range(nb - 1, -1, -1):
        leaving[:, :, t] = g
        g = a[:, :, t] + block_w[:, :, t] * g
    dk = dk + (vb * k_w) @ leaving.transpose(-1, -2)
    dv = dv + (kb * k_w) @ leaving
    ds0 = None if initial_state is None else g.to(initial_state.dtype)
    return _unblock(dq, s, q.dtype), _unblock(dk, s, k.dtype), _unblock(dv, s, v.dtype), ds0


_ChunkLightning = explicit_function(forward, backward, "_ChunkLightning")


def lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
              initial_state: torch.Tensor | None = None, chunk_size: int | None = None,
              doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd-aware chunked lightning attention → ``(out [B, S, H, E], state [B, H, D, E])``."""
    return _ChunkLightning.apply(q, k, v, decay, initial_state, chunk_size or DEFAULT_CHUNK, doc_ids)
