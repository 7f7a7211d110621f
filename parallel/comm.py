"""Communication helpers with a recorder, and a per-rank attention work counter.

Every collective or point-to-point call the context-parallel strategies make goes through the small
functions here, so a :class:`CommRecorder` sees all of it: calls and bytes sent / received per
collective kind on this rank. :class:`WorkCounter` counts the attention score elements each rank
computes (forward and backward separately), which is how load balance is measured without timing.

Bytes *sent* per call follow the bandwidth-optimal algorithm of each collective (what the minima of
framework/ARCHITECTURE.md §8 are written against):

* ``p2p``: the bytes of every tensor sent;
* ``all_to_all``: the input minus the part this rank keeps ((P−1)/P of it for even splits);
* ``all_gather``: (P−1) × the local input (every other rank needs it);
* ``reduce_scatter``: (P−1)/P × the input (each other rank's shard, once).

    with CommRecorder() as rec, WorkCounter() as work:
        out = cp_attention(q, k, v, strategy="ring", layout="zigzag")
    rec.bytes_sent("p2p"), work.computed["fwd"]
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "CommRecorder",
    "WorkCounter",
    "all_gather_into",
    "all_to_all_single",
    "group_ranks",
    "p2p",
    "record",
    "record_work",
    "recording",
    "reduce_scatter_into",
    "work_wanted",
]

_RECORDERS: list["CommRecorder"] = []
_COUNTERS: list["WorkCounter"] = []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CommRecorder:
    """Context manager counting calls and bytes per collective kind on this rank.

    Attributes:
        calls: kind -> number of calls.
        sent: kind -> bytes this rank sent.
        received: kind -> bytes this rank received.
    """

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    p2p_ops: list[tuple[str, int, int, int]] = field(default_factory=list)
    """Every point-to-point op in posting order: ("send" | "recv", global peer, tag, bytes)."""

    def __enter__(self) -> "CommRecorder":
        _RECORDERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _RECORDERS.remove(self)

    def add(self, kind: str, sent: int, received: int) -> None:
        self.calls[kind] += 1
        self.sent[kind] += int(sent)
        self.received[kind] += int(received)

    def bytes_sent(self, kind: str | None = None) -> int:
        """Bytes sent by this rank, for one kind or all kinds."""
        return sum(self.sent.values()) if kind is None else self.sent.get(kind, 0)

    def summary(self) -> dict[str, dict[str, int]]:
        return {k: {"calls": self.calls[k], "sent": self.sent[k], "received": self.received[k]} for k in self.calls}


@dataclass
class WorkCounter:
    """Context manager counting attention score elements computed on this rank, per phase.

    ``computed[phase]`` sums B × Sq × Sk × H over every block a local kernel was called on (what the
    kernel touches); with ``exact=True``, ``allowed[phase]`` sums only the pairs the mask allows.
    """

    exact: bool = False
    computed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    allowed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    blocks: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __enter__(self) -> "WorkCounter":
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _COUNTERS.remove(self)


def record(kind: str, sent: int, received: int) -> None:
    for r in _RECORDERS:
        r.add(kind, sent, received)


def work_wanted() -> tuple[bool, bool]:
    """(any counter active, any counter wants exact allowed counts)."""
    return bool(_COUNTERS), any(c.exact for c in _COUNTERS)


def record_work(phase: str, computed: int, allowed: int | None = None) -> None:
    for c in _COUNTERS:
        c.computed[phase] += int(computed)
        c.blocks[phase] += 1
        if allowed is not None:
            c.allowed[phase] += int(allowed)


# ------------------------------------------------------------------------------------------------
# helpers (the only places the strategies talk to torch.distributed)
# ------------------------------------------------------------------------------------------------


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``group`` in group-rank order (WORLD when None)."""
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def p2p(sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]]
        ) -> list[dist.Work]:
    """Post point-to-point sends and receives in one batch; returns the works to wait on.

    Args:
        sends: (tensor, global destination rank, tag).
        recvs: (tensor, global source rank, tag).
    """
    ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer, tag in recvs]
    if not ops:
        return []
    record("p2p", sum(_nbytes(t) for t, _, _ in sends), sum(_nbytes(t) for t, _, _ in recvs))
    for r in _RECORDERS:
        r.p2p_ops += [("send", peer, tag, _nbytes(t)) for t, peer, tag in sends]
        r.p2p_ops += [("recv", peer, tag, _nbytes(t)) for t, peer, tag in recvs]
    return dist.batch_isend_irecv(ops)


def all_to_all_single(output: torch.Tensor, inp: torch.Tensor, *, group: dist.ProcessGroup | None,
                      async_op: bool = False) -> dist.Work | None:
    """Even all-to-all along dim 0 (``inp`` ``[P, ...]`` → ``output`` ``[P, ...]``)."""
    p = dist.get_world_size(group)
    record("all_to_all", _nbytes(inp) * (p - 1) // p, _nbytes(output) * (p - 1) // p)
    return dist.all_to_all_single(output, inp.contiguous(), group=group, async_op=async_op)


_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into(output: torch.Tensor, inp: torch.Tensor, *, group: dist.ProcessGroup | None,
                    async_op: bool = False) -> dist.Work | None:
    """All-gather along dim 0: ``output`` ``[P·N, ...]`` from each rank's ``inp`` ``[N, ...]``."""
    p = dist.get_world_size(group)
    record("all_gather", _nbytes(inp) * (p - 1), _nbytes(inp) * (p - 1))
    return _ALL_GATHER(output, inp.contiguous(), group=group, async_op=async_op)


def reduce_scatter_into(output: torch.Tensor, inp: torch.Tensor, *, group: dist.ProcessGroup | None
                        ) -> None:
    """Sum-reduce-scatter along dim 0: ``inp`` ``[P·N, ...]`` → this rank's ``output`` ``[N, ...]``."""
    p = dist.get_world_size(group)
    record("reduce_scatter", _nbytes(inp) * (p - 1) // p, _nbytes(inp) * (p - 1) // p)
    _REDUCE_SCATTER(output, inp.contiguous(), group=group)


@contextlib.contextmanager
def recording() -> Iterator[CommRecorder]:
    """Shorthand: ``with recording() as rec: ...``."""
    with CommRecorder() as rec:
        yield rec
