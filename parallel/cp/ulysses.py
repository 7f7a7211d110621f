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

from collections.abc import Callable
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


def _to_sequence(recv: torch.Tensor, order: TokenOrder | None, heads: bool = False) -> torch.Tensor:
    """``[U, B, n, hl, D]`` member-major → ``[B, U·n, hl, D]`` in global order (one copy; stored
    heads-first with ``heads``, :func:`~.blocks.heads_first`)."""
    u, b, n, hl, d = recv.shape
    if order is None or order.kind in ("members", "index"):
        if heads:  # a copy, never a reshape: a reshape may return a token-major view of recv
            y = recv.new_empty(b, hl, u * n, d)  # [B, hl, U·n, D]
            y.view(b, hl, u, n, d).copy_(recv.permute(1, 3, 0, 2, 4))
            if order is not None and order.kind == "index":
                y = y.index_select(2, order.perm.to(y.device))
            return y.transpose(1, 2)
        y = recv.permute(1, 0, 2, 3, 4).reshape(b, u * n, hl, d)
        return y if order is None or order.kind == "members" else y.index_select(1, order.perm.to(y.device))
    if order.kind == "interleave":
        if heads:
            y = recv.new_empty(b, hl, n * u, d)
            y.view(b, hl, n, u, d).copy_(recv.permute(1, 3, 2, 0, 4))
            return y.transpose(1, 2)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, n * u, hl, d)
    y = recv.new_empty(b, hl, u * n, d).transpose(1, 2) if heads else recv.new_empty(b, u * n, hl, d)
    for m, s, ln, dst in order.segments:
        y[:, dst:dst + ln].copy_(recv[m, :, s:s + ln])
    return y


def _to_members(x: torch.Tensor, degree: int, order: TokenOrder | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`_to_sequence`: ``[B, U·n, hl, D]`` (token-major or heads-first) → ``[U, B, n, hl, D]``
    (one copy, into ``out`` if given, else a new contiguous tensor)."""
    b, un, hl, d = x.shape
    n = un // degree
    if out is None:
        out = x.new_empty(degree, b, n, hl, d)
    if order is not None and order.kind == "index":
        x = x.index_select(1, torch.argsort(order.perm).to(x.device))
    if order is None or order.kind in ("members", "index"):
        return out.copy_(x.unflatten(1, (degree, n)).permute(1, 0, 2, 3, 4))
    if order.kind == "interleave":
        return out.copy_(x.unflatten(1, (n, degree)).permute(2, 0, 1, 3, 4))
    for m, s, ln, dst in order.segments:
        out[m, :, s:s + ln].copy_(x[:, dst:dst + ln])
    return out


def _groups(xs: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``xs`` that can share one all-to-all buffer (same dtype, head size, batch and length)."""
    keys: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        keys.setdefault((x.dtype, x.shape[0], x.shape[1], x.shape[-1], x.device), []).append(i)
    return list(keys.values())


def _exchange(fills: list[Callable[[torch.Tensor], object]], widths: list[int], like: torch.Tensor,
              group: dist.ProcessGroup | None) -> tuple[torch.Tensor, list[int]]:
    """One all-to-all of several tensors packed side by side along the head axis.

    ``like`` ``[U, B, n, ·, D]`` gives the send buffer's other sizes, dtype and device; ``fills[j]`` writes
    tensor j's ``[U (destination), B, n, widths[j], D]`` part into the view it is given. Returns the receive
    buffer ``[U (source), B, n, Σwidths, D]`` and where each tensor's heads lie in it (``offs[j]:offs[j + 1]``)."""
    u, b, n, _, d = like.shape
    offs = [0]
    for w in widths:
        offs.append(offs[-1] + w)
    send = like.new_empty(u, b, n, offs[-1], d)
    for fill, lo, hi in zip(fills, offs, offs[1:]):
        fill(send[:, :, :, lo:hi])
    recv = torch.empty_like(send)
    all_to_all_single(recv, send, group=group)
    return recv, offs


def heads_to_seq_many(xs: list[torch.Tensor], *, group: dist.ProcessGroup | None, degree: int,
                      replicate: list[int] | None = None, order: TokenOrder | None = None,
                      heads: list[bool] | None = None) -> list[torch.Tensor]:
    """:func:`heads_to_seq` of several tensors, one all-to-all per (dtype, head size) group: each
    destination's heads of every tensor travel in one message (q, k and v in the forward; q, k, v, out
    and dout in a regathering backward), so a pass pays one collective's latency, not one per tensor.
    ``replicate`` and ``heads`` are per tensor (default 1 and False).

    The tensors of one layout leave the receive buffer in one reordering copy (they are packed side by
    side), as views of one buffer: each is stored as :func:`heads_to_seq` stores it alone."""
    replicate = replicate or [1] * len(xs)
    heads = heads or [False] * len(xs)
    result: list[torch.Tensor | None] = [None] * len(xs)
    for idx in _groups(xs):
        idx = sorted(idx, key=lambda i: heads[i])  # one layout's tensors side by side
        parts = []
        for i in idx:
            x, r = xs[i], replicate[i]
            if r > 1:
                x = x.index_select(2, torch.arange(degree, device=x.device) // r)  # [B, n, U, D]
            parts.append(x.unflatten(2, (degree, -1)).permute(2, 0, 1, 3, 4))  # [U, B, n, hl, D]
        recv, offs = _exchange([lambda out, p=p: out.copy_(p) for p in parts], [p.shape[3] for p in parts],
                               parts[0], group)  # [U (source), B, n, Σhl, D]
        del parts
        for hf in (False, True):
            mine = [j for j, i in enumerate(idx) if heads[i] == hf]
            if not mine:
                continue
            lo = offs[mine[0]]
            seq = _to_sequence(recv[:, :, :, lo:offs[mine[-1] + 1]], order, hf)  # [B, U·n, Σ, D]
            for j in mine:
                result[idx[j]] = seq[:, :, offs[j] - lo:offs[j + 1] - lo]
    return result  # type: ignore[return-value]


def alone_bytes(device: torch.device) -> int:
    """Size from which a tensor that needs no copy to be sent (:func:`seq_to_heads_many`) travels in its own
    all-to-all rather than being copied into a shared buffer: where copying it costs more than one more
    collective's fixed cost (gloo on CPU: ~0.3 ms, the time to copy ~1.5 MB; NCCL: tens of µs against
    copies at device memory bandwidth)."""
    return 1 << 20 if device.type == "cpu" else 1 << 25


def _alone(x: torch.Tensor, order: TokenOrder | None) -> bool:
    """``x`` ``[B, U·n, hl, D]`` travels in its own all-to-all: batch 1 and members in order, so its dense
    token-major storage (the layout kernels write gradients in) viewed ``[U, B, n, hl, D]`` is the
    all-to-all's input, and large enough to go alone. Decided from shape, dtype and order alone, so every
    rank posts the same collectives (a tensor stored otherwise is copied, as packing would)."""
    return ((order is None or order.kind == "members") and x.shape[0] == 1
            and x.numel() * x.element_size() >= alone_bytes(x.device))


def seq_to_heads_many(xs: list[torch.Tensor], *, group: dist.ProcessGroup | None, degree: int,
                      replicate: list[int] | None = None, order: TokenOrder | None = None) -> list[torch.Tensor]:
    """:func:`seq_to_heads` of several tensors, one all-to-all per (dtype, head size) group; a large tensor
    of batch 1 (:func:`_alone`: dq/dk/dv, stored the way they are sent) takes its own, with no copy."""
    replicate = replicate or [1] * len(xs)
    result: list[torch.Tensor | None] = [None] * len(xs)
    for idx in _groups(xs):
        alone = [i for i in idx if _alone(xs[i], order)]
        packed = [i for i in idx if i not in alone]
        parts: list[tuple[list[int], torch.Tensor, list[int]]] = []  # (indices, receive buffer, offsets)
        for i in alone:
            send = xs[i].contiguous().view(degree, 1, -1, *xs[i].shape[2:])  # [U (dest), 1, n, hl, D]
            recv = torch.empty_like(send)
            all_to_all_single(recv, send, group=group)
            parts.append(([i], recv, [0, xs[i].shape[2]]))
        if packed:
            fills = [lambda out, x=xs[i]: _to_members(x, degree, order, out=out) for i in packed]
            recv, offs = _exchange(fills, [xs[i].shape[2] for i in packed],
                                   xs[packed[0]].unflatten(1, (degree, -1)).transpose(0, 1), group)
            parts.append((packed, recv, offs))
        for ids, recv, offs in parts:
            _, b, n, _, d = recv.shape  # [U (head group), B, n, Σhl, D]
            for j, i in enumerate(ids):
                w = offs[j + 1] - offs[j]
                y = recv[:, :, :, offs[j]:offs[j + 1]].permute(1, 2, 0, 3, 4)  # [B, n, U, hl, D]
                y = y.reshape(b, n, degree * w, d)  # [B, n, U·hl, D]
                if replicate[i] > 1:
                    y = y.view(b, n, degree // replicate[i], replicate[i], d).sum(3)  # [B, n, Hkv, D]
                result[i] = y
    return result  # type: ignore[return-value]


def heads_to_seq(x: torch.Tensor, *, group: dist.ProcessGroup | None, degree: int, replicate: int = 1,
                 order: TokenOrder | None = None, heads: bool = False) -> torch.Tensor:
    """Scatter heads, gather sequence.

    Args:
        x: ``[B, n, Hx, D]`` this rank's tokens, all heads.
        degree: U, ranks in the Ulysses group.
        replicate: 1 to split the Hx heads evenly; r > 1 when Hx·r == U (destination j gets head j // r).
        order: where each member's tokens go (None: member after member).
        heads: store the result heads-first (the layout the CPU kernel reads best), at no extra copy.

    Returns:
        ``[B, U·n, Hx/U (or 1), D]``: this rank's heads for the tokens of every group member, in ``order``.
    """
    return heads_to_seq_many([x], group=group, degree=degree, replicate=[replicate], order=order,
                             heads=[heads])[0]


def seq_to_heads(x: torch.Tensor, *, group: dist.ProcessGroup | None, degree: int, replicate: int = 1,
                 order: TokenOrder | None = None) -> torch.Tensor:
    """Inverse of :func:`heads_to_seq`: ``[B, U·n, hl, D]`` → ``[B, n, U·hl, D]``.

    With ``replicate`` r > 1 (hl = 1), the U received head copies are summed in groups of r, giving
    ``[B, n, U/r, D]`` (the gradient of the replication).
    """
    return seq_to_heads_many([x], group=group, degree=degree, replicate=[replicate], order=order)[0]
