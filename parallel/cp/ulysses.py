"""Ulysses all-to-all: ``[B, n, H, D]`` per rank (sequence-split) ↔ ``[B, U·n, H/U, D]`` (head-split).

K/V heads are communicated as they are (never expanded to the query head count). When the degree U
exceeds the K/V head count (U a multiple of Hkv), each destination gets the one K/V head its query
heads use, so K/V heads are replicated U/Hkv times (DeepSpeed's KV replication); the backward sums
the replicas' gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import all_to_all_single


def heads_to_seq(x: torch.Tensor, *, group: dist.ProcessGroup | None, degree: int, replicate: int = 1
                 ) -> torch.Tensor:
    """Scatter heads, gather sequence.

    Args:
        x: ``[B, n, Hx, D]`` this rank's tokens, all heads.
        degree: U, ranks in the Ulysses group.
        replicate: 1 to split the Hx heads evenly; r > 1 when Hx·r == U (destination j gets head j // r).

    Returns:
        ``[B, U·n, Hx/U (or 1), D]``: this rank's heads for the tokens of every group member, in member order.
    """
    b, n, hx, d = x.shape
    if replicate > 1:
        idx = torch.arange(degree, device=x.device) // replicate
        x = x.index_select(2, idx)  # [B, n, U, D]
        hl = 1
    else:
        hl = hx // degree
    send = x.reshape(b, n, degree, hl, d).permute(2, 0, 1, 3, 4).contiguous()  # [U, B, n, hl, D]
    recv = torch.empty_like(send)
    all_to_all_single(recv, send, group=group)  # [U (source), B, n, hl, D]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, degree * n, hl, d)


def seq_to_heads(x: torch.Tensor, *, group: dist.ProcessGroup | None, degree: int, replicate: int = 1
                 ) -> torch.Tensor:
    """Inverse of :func:`heads_to_seq`: ``[B, U·n, hl, D]`` → ``[B, n, U·hl, D]``.

    With ``replicate`` r > 1 (hl = 1), the U received head copies are summed in groups of r, giving
    ``[B, n, U/r, D]`` (the gradient of the replication).
    """
    b, un, hl, d = x.shape
    n = un // degree
    send = x.reshape(b, degree, n, hl, d).permute(1, 0, 2, 3, 4).contiguous()  # [U (dest), B, n, hl, D]
    recv = torch.empty_like(send)
    all_to_all_single(recv, send, group=group)  # [U (head group), B, n, hl, D]
    y = recv.permute(1, 2, 0, 3, 4).reshape(b, n, degree * hl, d)  # [B, n, U·hl, D]
    if replicate > 1:
        y = y.view(b, n, degree // replicate, replicate, d).sum(3)  # [B, n, Hkv, D]
    return y
