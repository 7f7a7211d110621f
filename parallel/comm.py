"""Communication helpers with a recorder, and a per-rank attention work counter.

Every collective or point-to-point call longreach makes across ranks (context-parallel strategies,
sequence layouts, expert dispatch, expert gradient reduction) goes through the small functions here,
so a :class:`CommRecorder` sees all of it: calls and bytes sent / received per collective kind on this
rank. (Gradient reduction inside DDP / FSDP2 / DeepSpeed belongs to those libraries.) :class:`WorkCounter` counts the attention score elements each rank
computes (forward and backward separately), which is how load balance is measured without timing.

Bytes *sent* per call follow the bandwidth-optimal algorithm of each collective (what the minima of
framework/ARCHITECTURE.md §8 are written against):

* ``p2p``: the bytes of every tensor sent;
* ``all_to_all``: the input minus the part this rank keeps ((P−1)/P of it for even splits);
* ``all_gather``: (P−1) × the local input (every other rank needs it);
* ``reduce_scatter``: (P−1)/P × the input (each other rank's shard, once);
* ``all_reduce``: 2 (P−1)/P × the tensor (ring reduce-scatter then all-gather).

    with CommRecorder() as rec, WorkCounter() as work:
        out = cp_attention(q, k, v, strategy="ring", layout="zigzag")
    rec.bytes_sent("p2p"), work.computed["fwd"]
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
import torch
import torch.distributed as dist

__all__ = [
    "CPGroup",
    "CommRecorder",
    "WorkCounter",
    "all_gather",
    "all_gather_into",
    "all_reduce",
    "all_to_all_single",
    "group_ranks",
    "p2p",
    "record",
    "record_work",
    "reduce_scatter_into",
    "work_wanted",
]

_RECORDERS: list["CommRecorder"] = []
_COUNTERS: list["WorkCounter"] = []


@dataclass(frozen=True, slots=True, eq=False)
class CPGroup:
    """A context-parallel group with the hybrid strategy's Ulysses sub-group, as
    :meth:`longreach.parallel.ParallelDims.cp_groups` hands it out (``cp_attention``'s ``group`` may be one)."""

    group: dist.ProcessGroup
    """The whole context-parallel group."""
    ulysses: dist.ProcessGroup | None = None
    """This rank's Ulysses group inside it (consecutive ranks); None: the strategy creates none."""


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
                      async_op: bool = False, output_split_sizes: list[int] | None = None,
                      input_split_sizes: list[int] | None = None) -> dist.Work | None:
    """All-to-all along dim 0: even (``inp`` ``[P, ...]`` → ``output`` ``[P, ...]``), or with per-rank
    row counts (``input_split_sizes`` rows to each rank, ``output_split_sizes`` rows from each)."""
    p = dist.get_world_size(group)
    if input_split_sizes is None:
        sent, received = _nbytes(inp) * (p - 1) // p, _nbytes(output) * (p - 1) // p
    else:  # rows to / from this rank itself stay local
        me = dist.get_rank(group)
        row_in = _nbytes(inp) // max(inp.shape[0], 1)
        row_out = _nbytes(output) // max(output.shape[0], 1)
        sent = row_in * (sum(input_split_sizes) - input_split_sizes[me])
        received = row_out * (sum(output_split_sizes or []) - (output_split_sizes or [0] * p)[me])
    record("all_to_all", sent, received)
    return dist.all_to_all_single(output, inp.contiguous(), output_split_sizes=output_split_sizes,
                                  input_split_sizes=input_split_sizes, group=group, async_op=async_op)


def all_gather(parts: list[torch.Tensor], inp: torch.Tensor, *, group: dist.ProcessGroup | None) -> None:
    """All-gather into a list: ``parts[r]`` receives rank r's ``inp`` (shapes may differ per rank)."""
    p = dist.get_world_size(group)
    record("all_gather", _nbytes(inp) * (p - 1), sum(_nbytes(t) for t in parts) - _nbytes(inp))
    dist.all_gather(parts, inp.contiguous(), group=group)


def all_reduce(t: torch.Tensor, *, group: dist.ProcessGroup | None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
               ) -> None:
    """In-place all-reduce of ``t`` over ``group`` (default SUM)."""
    p = dist.get_world_size(group)
    record("all_reduce", 2 * _nbytes(t) * (p - 1) // p, 2 * _nbytes(t) * (p - 1) // p)
    dist.all_reduce(t, op=op, group=group)


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
