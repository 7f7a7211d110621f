"""The model seam under context parallelism: an ``inner_attention(q, k, v, ctx)`` running ``cp_attention``.

The parallelize step installs one of these in every softmax attention layer (DESIGN.md §2, "The model
seam"); the trainer shards inputs, labels and position ids with the same ``layout`` over the same
``group``. ``ctx`` is duck-typed (``longreach.attention.AttentionContext``: ``seq_len``,
``cu_seqlens``, ``step``, ``layer``, ``training``, ``scale``) so this package imports no framework code.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longreach.kernels import masks as M

from ..layouts import DocumentZigzag, group_rank_size
from .api import cp_attention


class ContextParallelAttention:
    """Causal (document-aware) softmax attention over the context-parallel ``group``.

    Args:
        strategy: ``ring``, ``ulysses``, ``hybrid`` or ``allgather``.
        layout: the layout the trainer sharded the sequence with (a name or a :class:`DocumentZigzag`).
        group: the context-parallel process group (None: WORLD).
        ulysses_degree: for ``hybrid``.
        backend: local attention backend.
        train_mask: extra mask (S2/SF/SSA …) applied only while ``ctx.training``.
    """

    def __init__(self, *, strategy: str, layout: str | DocumentZigzag, group: dist.ProcessGroup | None = None,
                 ulysses_degree: int | None = None, backend: str = "auto", train_mask: M.Mask | None = None) -> None:
        self.strategy, self.layout, self.group = strategy, layout, group
        self.ulysses_degree, self.backend, self.train_mask = ulysses_degree, backend, train_mask

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Any) -> torch.Tensor:
        """q ``[B, S/P, H, D]``, k/v ``[B, S/P, Hkv, D]`` (local shards) → out ``[B, S/P, H, D]``."""
        _, world = group_rank_size(self.group)
        seq_len = getattr(ctx, "seq_len", None)
        if seq_len is not None and seq_len != q.shape[1] * world:
            raise ValueError(f"context-parallel attention: ctx.seq_len={seq_len} but {q.shape[1]} local tokens × "
                             f"{world} ranks = {q.shape[1] * world}; shard inputs with the same layout and group")
        cu = getattr(ctx, "cu_seqlens", None)
        mask: M.Mask | None = None if cu is None else M.documents(cu)
        if self.train_mask is not None and getattr(ctx, "training", True):
            extra = self.train_mask.at(step=getattr(ctx, "step", 0), layer=getattr(ctx, "layer", 0))
            mask = extra if mask is None else mask & extra
        return cp_attention(q, k, v, strategy=self.strategy, layout=self.layout, group=self.group, causal=True,
                            mask=mask, scale=getattr(ctx, "scale", None), ulysses_degree=self.ulysses_degree,
                            backend=self.backend)
