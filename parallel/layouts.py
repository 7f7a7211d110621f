"""Sequence layouts: which global tokens each context-parallel rank holds (DESIGN.md §2).

* ``contiguous`` — rank r holds tokens [r·S/P, (r+1)·S/P).
* ``zigzag`` — the sequence is cut into 2P chunks; rank r holds chunks r and 2P−1−r (in that order),
  which balances causal attention work.
* ``stripe`` — token i lives on rank i mod P (Striped Attention).

The sequence length must divide by P (2P for zigzag), else the call raises naming the layout;
:func:`pad_to_layout` pads on the caller's side.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag", "stripe")

__all__ = [
    "LAYOUTS",
    "group_rank_size",
    "layout_multiple",
    "pad_to_layout",
    "sequence_positions",
    "shard_sequence",
    "unshard_sequence",
]


def group_rank_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, size) of this process in ``group`` (WORLD by default; (0, 1) without a process group)."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("a process group was passed but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def layout_multiple(layout: str, world_size: int) -> int:
    """What the sequence length must divide by under ``layout`` on ``world_size`` ranks."""
    _check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def _check_len(seq_len: int, layout: str, world_size: int) -> None:
    m = layout_multiple(layout, world_size)
    if seq_len % m != 0:
        raise ValueError(
            f"sequence length {seq_len} does not divide by {m} as layout={layout!r} needs on "
            f"{world_size} context-parallel ranks; pad it (longreach.parallel.pad_to_layout) or change "
            "the sequence length"
        )


def positions_for(seq_len: int, layout: str, rank: int, world_size: int) -> torch.Tensor:
    """Global positions held by ``rank`` (LongTensor ``[seq_len / world_size]``)."""
    _check_layout(layout)
    _check_len(seq_len, layout, world_size)
    if layout == "contiguous":
        n = seq_len // world_size
        return torch.arange(rank * n, (rank + 1) * n)
    if layout == "stripe":
        return torch.arange(rank, seq_len, world_size)
    c = seq_len // (2 * world_size)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)])


def sequence_positions(seq_len: int, *, layout: str, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global position of each local token under ``layout`` over ``group`` (LongTensor ``[S/P]``)."""
    rank, size = group_rank_size(group)
    return positions_for(seq_len, layout, rank, size)


def shard_sequence(x: torch.Tensor, *, layout: str, group: dist.ProcessGroup | None = None, dim: int = 1
                   ) -> torch.Tensor:
    """This rank's part of the full sequence ``x`` (same on every rank) along ``dim``."""
    rank, size = group_rank_size(group)
    pos = positions_for(x.shape[dim], layout, rank, size).to(x.device)
    if layout == "contiguous":
        n = pos.numel()
        return x.narrow(dim, rank * n, n).contiguous()
    return x.index_select(dim, pos).contiguous()


def unshard_sequence(x_local: torch.Tensor, *, layout: str, group: dist.ProcessGroup | None = None, dim: int = 1
                     ) -> torch.Tensor:
    """Reassemble the full sequence from every rank's part (an all-gather; not differentiable)."""
    rank, size = group_rank_size(group)
    _check_layout(layout)
    if size == 1:
        return x_local
    parts = [torch.empty_like(x_local) for _ in range(size)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    n = x_local.shape[dim]
    seq_len = n * size
    shape = list(x_local.shape)
    shape[dim] = seq_len
    out = x_local.new_empty(shape)
    for r, part in enumerate(parts):
        out.index_copy_(dim, positions_for(seq_len, layout, r, size).to(x_local.device), part)
    return out


def pad_to_layout(x: torch.Tensor, *, layout: str, world_size: int, dim: int = 1, value: float | int = 0
                  ) -> torch.Tensor:
    """Pad ``x`` along ``dim`` with ``value`` up to the next length ``layout`` accepts."""
    m = layout_multiple(layout, world_size)
    pad = (-x.shape[dim]) % m
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=dim)
