"""Ulysses all-to-all: ``[B, n, H, D]`` per rank (sequence-split) ↔ ``[B, U·n, H/U, D]`` (head-split).

K/V heads are communicated as they are (never expanded to the query head count). When the degree U
exceeds the K/V head count (U a multiple of Hkv), each destination gets the one K/V head its query
heads use, so K/V heads are replicated U/Hkv times (DeepSpeed's KV replication); the backward sums
the replicas' gradients.

The gathered tokens come out in *global position order* (:class:`TokenOrder`): the copy that turns
the all-to-all's member-major buffer into a sequence is needed anyway, and it places each member's
tokens where they belong (contiguous: member after member; stripe: interleaved token by token;
zigzag: a member's two chunks at the two ends of the group's span), so no separate reorder pass
(``index_select``) runs under any layout name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..comm import all_to_all_single

# More (member, run) segments than this and the order falls back to one index_select.
_MAX_SEGMENTS = 256


@dataclass(frozen=True, eq=False)
class TokenOrder:
    """Where each Ulysses member's ``n`` tokens go in the group's sorted ``U·n`` tokens.

    ``kind``: ``members`` (member after member: already sorted), ``interleave`` (token m of member i at
    m·U + i: stripe), ``segments`` (copies of (member, start, length, destination) runs: zigzag,
    per-document zigzag with few documents) or ``index`` (a permutation, many documents).
    """

    kind: str
    segments: tuple[tuple[int, int, int, int], ...] = ()
    perm: torch.Tensor | None = None
    """``index``: sorted position i takes member-major token perm[i]."""

    @classmethod
    def build(cls, member_positions: list[torch.Tensor]) -> "TokenOrder":
        """From the sorted global positions of each member (all the same length)."""
        u, n = len(member_positions), member_positions[0].numel()
        cat = torch.cat(member_positions)  # [U·n], member-major
        perm = torch.argsort(cat)
        if bool((perm == torch.arange(u * n)).all()):
            return cls("members")
        if bool((torch.stack(member_positions, 1).reshape(-1).diff() > 0).all()):
            return cls("interleave")
        # runs of consecutive member-major indices (one member's tokens) in sorted order
        cut = (perm.diff() != 1) | (perm[1:] % n == 0)
        starts = [0, *(cut.nonzero().flatten() + 1).tolist()]
        if len(starts) > _MAX_SEGMENTS:
            return cls("index", perm=perm)
        stops = starts[1:] + [u * n]
        segs = tuple((int(perm[a]) // n, int(perm[a]) % n, b - a, a) for a, b in zip(starts, stops))
        return cls("segments", segments=segs)


def _to_sequence(recv: torch.Tensor, order: TokenOrder | None) -> torch.Tensor:
    """``[U, B, n, hl, D]`` member-major → ``[B, U·n, hl, D]`` in global order (one copy)."""
    u, b, n, hl, d = recv.shape
    if order is None or order.kind in ("members", "index"):
        y = recv.permute(1, 0, 2, 3, 4).reshape(b, u * n, hl, d)
        return y if order is None or order.kind == "members" else y.index_select(1, order.perm.to(y.device))
    if order.kind == "interleave":
        return recv.permute(1, 2, 0, 3, 4).reshape(b, n * u, hl, d)
    y = recv.new_empty(b, u * n, hl, d)
    for m, s, ln, dst in order.segments:
        y[:, dst:dst + ln].copy_(recv[m, :, s:s + ln])
    return y


def _to_members(x: torch.Tensor, degree: int, order: TokenOrder | None) -> torch.Tensor:
    """Inverse of :func:`_to_sequence`: ``[B, U·n, hl, D]`` → contiguous ``[U, B, n, hl, D]``."""
    b, un, hl, d = x.shape
    n = un // degree
    if order is not None and order.kind == "index":
        x = x.index_select(1, torch.argsort(order.perm).to(x.device))
    if order is None or order.kind in ("members", "index"):
        return x.reshape(b, degree, n, hl, d).permute(1, 0, 2, 3, 4).contiguous()
    if order.kind == "interleave":
        return x.reshape(b, n, degree, hl, d).permute(2, 0, 1, 3, 4).contiguous()
    send = x.new_empty(degree, b, n, hl, d)
    for m, s, ln, dst in order.segments:
        send[m, :, s:s + ln].copy_(x[:, dst:dst + ln])
    return send


def heads_to_seq(x: torch.Tensor, *, group: dist.ProcessGroup | None, degree: int, replicate: int = 1,
                 order: TokenOrder | None = None) -> torch.Tensor:
    """Scatter heads, gather sequence.

    Args:
        x: ``[B, n, Hx, D]`` this rank's tokens, all heads.
        degree: U, ranks in the Ulysses group.
        replicate: 1 to split the Hx heads evenly; r > 1 when Hx·r == U (destination j gets head j // r).
        order: where each member's tokens go (None: member after member).

    Returns:
        ``[B, U·n, Hx/U (or 1), D]``: this rank's heads for the tokens of every group member, in ``order``.
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
    del send
    return _to_sequence(recv, order)


def seq_to_heads(x: torch.Tensor, *, group: dist.ProcessGroup | None, degree: int, replicate: int = 1,
                 order: TokenOrder | None = None) -> torch.Tensor:
    """Inverse of :func:`heads_to_seq`: ``[B, U·n, hl, D]`` → ``[B, n, U·hl, D]``.

    With ``replicate`` r > 1 (hl = 1), the U received head copies are summed in groups of r, giving
    ``[B, n, U/r, D]`` (the gradient of the replication).
    """
    b, un, hl, d = x.shape
    n = un // degree
    send = _to_members(x, degree, order)  # [U (dest), B, n, hl, D]
    recv = torch.empty_like(send)
    all_to_all_single(recv, send, group=group)  # [U (head group), B, n, hl, D]
    del send
    y = recv.permute(1, 2, 0, 3, 4).reshape(b, n, degree * hl, d)  # [B, n, U·hl, D]
    if replicate > 1:
        y = y.view(b, n, degree // replicate, replicate, d).sum(3)  # [B, n, Hkv, D]
    return y
