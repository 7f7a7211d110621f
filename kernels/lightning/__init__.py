"""Lightning attention: causal linear attention with a per-head exponential decay (TransNormerLLM).

    O = [(Q Kᵀ) ⊙ M] V,   M[h, i, j] = exp(−s_h (i − j)) for j ≤ i       (no softmax, no 1/√d)

Implementations, one module each (reference beside the fast paths):

* ``naive`` — materialised ``[S, S]`` decay matrix, float64-capable: the oracle;
* ``chunk`` — Lightning Attention-2 blocks in PyTorch with an explicit backward (CPU default);
* ``triton`` — the same algorithm as Triton kernels, forward and backward (CUDA default;
  ``TRITON_INTERPRET=1`` on CPU);
* ``recurrent`` — the token-by-token recurrence, and :func:`decode_step` for generation.

Packed documents (``cu_seqlens``, see :mod:`.documents`) restart the state at each document: every
backend then equals running each document alone. The contract's parameters are unchanged; documents
arrive through the keyword-only ``cu_seqlens`` that follows them. Sequence parallelism (LASP) cuts
documents across chunks and calls :func:`lightning_by_document_ids` with the document id of each token.
"""
from __future__ import annotations

import importlib

import torch

from .documents import CuSeqlens, document_ids
from .naive import forward as naive_forward
from .recurrent import decode_step

__all__ = ["BACKENDS", "decode_step", "document_ids", "lightning_attention", "lightning_by_document_ids"]

BACKENDS = ("naive", "chunk", "triton", "recurrent")


def _resolve(backend: str, q: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if q.device.type == "cuda" and q.dtype != torch.float64 else "chunk"
    if backend not in BACKENDS:
        raise ValueError(f"unknown lightning attention backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    return backend


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
           chunk_size: int | None, initial_state: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"lightning attention: q and k must both be [B, S, H, D]; got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    b, s, h, d = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning attention: v must be [B, S, H, E] = [{b}, {s}, {h}, E]; got {tuple(v.shape)}")
    if s == 0:
        raise ValueError("lightning attention: the sequence is empty")
    if not isinstance(decay, torch.Tensor) or decay.shape != (h,):
        shape = tuple(decay.shape) if isinstance(decay, torch.Tensor) else type(decay).__name__
        raise ValueError(f"lightning attention: decay must be a [H] = [{h}] tensor of rates; got {shape}")
    if not torch.is_floating_point(decay) or bool((decay < 0).any()) or not bool(torch.isfinite(decay).all()):
        raise ValueError("lightning attention: decay rates must be finite and >= 0 (rate s gives a factor e^-s per token)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"lightning attention: chunk_size must be >= 1, got {chunk_size}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, d, v.shape[-1]):
        raise ValueError(f"lightning attention: initial_state must be [B, H, D, E] = {[b, h, d, v.shape[-1]]}; "
                         f"got {tuple(initial_state.shape)}")


def lightning_attention(q, k, v, decay, *, backend="auto", chunk_size=None, initial_state=None,
                        return_state=False, cu_seqlens: CuSeqlens = None):
    """Causal linear attention with per-head exponential decay (Lightning Attention).

    Args:
        q: ``[B, S, H, D]``; k: ``[B, S, H, D]``; v: ``[B, S, H, E]``.
        decay: ``[H]`` rates s_h >= 0 (the factor per token is e^{−s_h}); not differentiated.
        backend: ``"auto"`` (triton on CUDA, chunk on CPU), ``"naive"``, ``"chunk"``, ``"triton"``,
            ``"recurrent"``.
        chunk_size: block length of the chunked and Triton kernels (default 64).
        initial_state: ``[B, H, D, E]`` state S0 carried in from earlier tokens; it contributes
            ``exp(−s_h (i + 1)) · q_i S0`` to output row i. Differentiable.
        return_state: also return the final state.
        cu_seqlens: packed documents — offsets ``[n+1]`` where documents begin (starting at 0, shared by
            every row), or one such tensor per row (a sequence of B, or ``[B, n+1]``). The state restarts
            at each document, so each document's output equals running it alone; ``initial_state``
            reaches the first document only. None: one document.

    Returns:
        out ``[B, S, H, E]`` in q's dtype, or ``(out, state)`` with state ``[B, H, D, E]`` in float32
        (float64 for float64 input): ``exp(−s S)·S0 + Σ_j exp(−s (S−1−j)) k_jᵀ v_j`` (with documents:
        the state of the last document alone).
    """
    _check(q, k, v, decay, chunk_size, initial_state)
    b, s = q.shape[:2]
    doc_ids = None
    if cu_seqlens is not None:
        doc_ids = document_ids(cu_seqlens, torch.arange(s, device=q.device), batch=b, seq_len=s)  # [1|B, S]
    out, state = lightning_by_document_ids(q, k, v, decay, doc_ids, backend=backend, chunk_size=chunk_size,
                                           initial_state=initial_state, checked=True)
    return (out, state) if return_state else out


def lightning_by_document_ids(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                              doc_ids: torch.Tensor | None, *, backend: str = "auto", chunk_size: int | None = None,
                              initial_state: torch.Tensor | None = None, checked: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lightning_attention` with documents given as the document id of every token.

    Args:
        q, k, v, decay, backend, chunk_size, initial_state: as in :func:`lightning_attention`.
        doc_ids: ``[1 | B, S]`` int64 non-decreasing document id per token (row 0 shared by every batch
            row when there is one row), or None (one document).
        checked: the inputs were already validated.

    Returns:
        ``(out [B, S, H, E], state [B, H, D, E])``.
    """
    if not checked:
        _check(q, k, v, decay, chunk_size, initial_state)
    if doc_ids is not None and (doc_ids.dim() != 2 or doc_ids.shape[1] != q.shape[1]
                                or doc_ids.shape[0] not in (1, q.shape[0])):
        raise ValueError(f"lightning attention: doc_ids must be [1 or B, S] = [1|{q.shape[0]}, {q.shape[1]}]; "
                         f"got {tuple(doc_ids.shape)}")
    name = _resolve(backend, q)
    if name == "naive":
        return naive_forward(q, k, v, decay, initial_state, doc_ids)
    module = importlib.import_module(f"{__name__}.{name}")
    return module.lightning(q, k, v, decay, initial_state, chunk_size, doc_ids)
