"""Packed documents in lightning attention: the recurrent state restarts where a document begins.

Documents are given as ``cu_seqlens`` — offsets where each document begins (``[n+1]``, starting at 0),
the same offsets the softmax layers' ``documents`` mask takes — either one tensor shared by every batch
row or one per row. Kernels see them as *document ids*: ``doc[b, i]`` is the document of token i, and
for tokens i ≥ j the decayed term ``exp(−s (i − j)) q_i k_jᵀ v_j`` survives only when
``doc[b, i] == doc[b, j]``. An initial state belongs to the document of token 0 (it is the state of
that document's earlier tokens), so it reaches only the tokens of the first document.

Blocked kernels apply this as four 0/1 factors next to the decay weights of a block of tokens
``[start, start + n)`` (``prev`` = the token before ``start``, or token 0 for the first block):

* intra-block: ``same[i, j] = doc_i == doc_j``;
* entering state → query i: ``doc_i == doc_prev``;
* key j → state leaving the block: ``doc_j == doc_last`` (the last real token of the block);
* state across the block: ``doc_prev == doc_last``.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["CuSeqlens", "document_ids"]

CuSeqlens = torch.Tensor | Sequence[int] | Sequence[torch.Tensor] | None


def _rows(cu_seqlens: CuSeqlens, batch: int) -> list[torch.Tensor]:
    """One ``[n+1]`` int64 tensor per row (a single one when shared by every row)."""
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 2:
        rows = list(cu_seqlens.unbind(0))
    elif isinstance(cu_seqlens, (tuple, list)) and cu_seqlens and not isinstance(cu_seqlens[0], int):
        rows = [torch.as_tensor(c) for c in cu_seqlens]
    else:
        rows = [torch.as_tensor(cu_seqlens)]
    if len(rows) != 1 and len(rows) != batch:
        raise ValueError(f"lightning attention: cu_seqlens has {len(rows)} rows for a batch of {batch}; give one "
                         "[n+1] tensor shared by every row or one per row")
    return [r.reshape(-1).to(torch.long) for r in rows]


def document_ids(cu_seqlens: CuSeqlens, positions: torch.Tensor, *, batch: int, seq_len: int) -> torch.Tensor:
    """Document index of each position.

    Args:
        cu_seqlens: document offsets ``[n+1]`` (shared by all rows), ``[B, n+1]``, or a sequence of B
            ``[n+1]`` tensors; must start at 0, be non-decreasing and stay within ``seq_len``.
        positions: ``[P]`` int positions in ``[0, seq_len)`` whose documents are wanted.
        batch: B, the batch size the offsets describe.
        seq_len: length of the (global) sequence the offsets index.

    Returns:
        ``[R, P]`` int64 document ids, R = 1 for shared offsets and B for per-row offsets; tokens from
        ``cu_seqlens[-1]`` on form one more document.
    """
    rows = _rows(cu_seqlens, batch)
    for cu in rows:
        if cu.numel() < 1 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > seq_len:
            shown = cu.tolist()[:8]
            raise ValueError(f"lightning attention: cu_seqlens must start at 0, be non-decreasing and end at most "
                             f"at the sequence length {seq_len}; got {shown}{'…' if cu.numel() > 8 else ''}")
    pos = positions.to(torch.long).reshape(-1).contiguous()  # [P]
    ids = [torch.searchsorted(cu.to(pos.device), pos, right=True) - 1 for cu in rows]  # each [P]
    return torch.stack(ids)  # [R, P]
