"""Sequence layouts: which global tokens each context-parallel rank holds (framework/ARCHITECTURE.md §2).

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

from .comm import all_gather

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


def check_divisible(seq_len: int, *, layout: str, cp: int, setting: str = "sequence length") -> None:
    """The one sequence-divisibility check: raise ``ValueError`` naming ``setting`` unless ``seq_len``
    divides by what ``layout`` needs on ``cp`` ranks (cp; 2·cp for zigzag)."""
    m = layout_multiple(layout, cp)
    if seq_len % m:
        raise ValueError(f"{setting}={seq_len} does not divide by {m}, as parallel.layout={layout!r} needs on "
                         f"parallel.cp={cp} ranks; use a multiple of {m} (or pad it: "
                         "longreach.parallel.pad_to_layout)")


def _check_len(seq_len: int, layout: str, world_size: int) -> None:
    check_divisible(seq_len, layout=layout, cp=world_size)


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
    all_gather(parts, x_local, group=group)
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


# ------------------------------------------------------------------------------------------------
# Per-document zigzag for packed documents
# ------------------------------------------------------------------------------------------------


def _as_cu(cu_seqlens: torch.Tensor | list[int]) -> torch.Tensor:
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long).reshape(-1).cpu()
    if cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()[:8]}")
    return cu


def pad_documents(x: torch.Tensor, cu_seqlens: torch.Tensor | list[int], *, world_size: int, dim: int = 1,
                  value: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad each packed document of ``x`` at its end to a multiple of 2P tokens (per-document zigzag).

    Args:
        x: packed sequence, documents along ``dim`` (e.g. ``[B, S, ...]`` or token ids ``[B, S]``).
        cu_seqlens: ``[n_docs + 1]`` document offsets in ``x`` (cu[-1] == x.shape[dim]).
        world_size: context-parallel ranks P.
        value: fill value (use the ignore index for labels).

    Returns:
        ``(x_padded, cu_padded)``: every document length now divides by 2P. Padding sits after each
        document's last token, so under causal document masks no real token attends to it.
    """
    cu = _as_cu(cu_seqlens)
    if int(cu[-1]) != x.shape[dim]:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but the packed sequence has {x.shape[dim]} tokens")
    m = 2 * world_size
    parts, new_cu = [], [0]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = b - a
        pad = (-n) % m
        parts.append(x.narrow(dim, a, n))
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            parts.append(x.new_full(shape, value))
        new_cu.append(new_cu[-1] + n + pad)
    return torch.cat(parts, dim=dim), torch.tensor(new_cu, dtype=torch.long)


class DocumentZigzag:
    """Layout of packed documents: each document cut into 2P chunks, rank r holds chunks r and
    2P−1−r of *every* document (in document order), which balances causal work per document.

    Every document length must divide by 2P (:func:`pad_documents`). Accepted as ``layout=`` by
    ``cp_attention`` wherever a layout name is.
    """

    name = "doc_zigzag"

    def __init__(self, cu_seqlens: torch.Tensor | list[int]) -> None:
        self.cu_seqlens = _as_cu(cu_seqlens)

    def __repr__(self) -> str:
        return f"DocumentZigzag(cu_seqlens={self.cu_seqlens.tolist()})"

    @property
    def seq_len(self) -> int:
        return int(self.cu_seqlens[-1])

    def check(self, seq_len: int, world_size: int) -> None:
        """Raise (naming the layout) unless this layout fits ``seq_len`` tokens on ``world_size`` ranks."""
        if seq_len != self.seq_len:
            raise ValueError(f"layout=DocumentZigzag covers {self.seq_len} tokens but the sequence has {seq_len}")
        lens = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        bad = (lens % (2 * world_size)) != 0
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"layout=DocumentZigzag: document {i} has {int(lens[i])} tokens, not a multiple of 2P = "
                f"{2 * world_size}; pad the documents first (longreach.parallel.pad_documents)"
            )

    def positions(self, rank: int, world_size: int) -> torch.Tensor:
        """Global positions held by ``rank`` (LongTensor ``[S / P]``, sorted)."""
        self.check(self.seq_len, world_size)
        out = []
        for a, b in zip(self.cu_seqlens[:-1].tolist(), self.cu_seqlens[1:].tolist()):
            c = (b - a) // (2 * world_size)
            if c == 0:
                continue
            out.append(torch.arange(a + rank * c, a + (rank + 1) * c))
            out.append(torch.arange(a + (2 * world_size - 1 - rank) * c, a + (2 * world_size - rank) * c))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def local_cu_seqlens(self, world_size: int) -> torch.Tensor:
        """Document offsets within every rank's local tokens (each document keeps 2·len/(2P) tokens)."""
        self.check(self.seq_len, world_size)
        return self.cu_seqlens // world_size


def shard_documents(x: torch.Tensor, cu_seqlens: torch.Tensor | list[int], *,
                    group: dist.ProcessGroup | None = None, dim: int = 1) -> torch.Tensor:
    """This rank's part of packed ``x`` under the per-document zigzag (:class:`DocumentZigzag`)."""
    rank, size = group_rank_size(group)
    pos = DocumentZigzag(cu_seqlens).positions(rank, size).to(x.device)
    return x.index_select(dim, pos).contiguous()


def unshard_documents(x_local: torch.Tensor, cu_seqlens: torch.Tensor | list[int], *,
                      group: dist.ProcessGroup | None = None, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_documents` (an all-gather; not differentiable)."""
    rank, size = group_rank_size(group)
    layout = DocumentZigzag(cu_seqlens)
    if size == 1:
        return x_local
    parts = [torch.empty_like(x_local) for _ in range(size)]
    all_gather(parts, x_local, group=group)
    shape = list(x_local.shape)
    shape[dim] = layout.seq_len
    out = x_local.new_empty(shape)
    for r, part in enumerate(parts):
        out.index_copy_(dim, layout.positions(r, size).to(x_local.device), part)
    return out


__all__ += ["DocumentZigzag", "pad_documents", "shard_documents", "unshard_documents"]
