"""The model seam: one ``inner_attention(q, k, v, ctx)`` callable per attention layer (DESIGN.md §2).

Models are written for one device. An attention layer computes q, k, v (``[B, S_local, H, D]``),
applies positions, then calls ``self.inner_attention(q, k, v, ctx)``. Context parallelism, masks and
kernels are applied from outside by replacing that callable (the ``parallelize`` step), never by
branches inside model code.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from longreach.kernels import attention as local_attention_op
from longreach.kernels import masks as M


@dataclass(frozen=True)
class AttentionContext:
    """What an inner attention needs to know beyond q, k, v.

    Attributes:
        layer: index of the layer (random masks and attention-aware routing read it).
        step: training step (SSA draws a fresh sample each step).
        seq_len: global sequence length (None: the local length, i.e. no context parallelism).
        positions: ``[S_local]`` global positions of the local tokens (None: 0..S_local-1).
        cu_seqlens: global document offsets of packed documents (None: one document).
        training: False in evaluation (S2/SF/SSA fall back to full causal attention).
        scale: softmax scale (None: 1/sqrt(head_dim)); HF models pass their own.
    """

    layer: int = 0
    step: int = 0
    seq_len: int | None = None
    positions: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    training: bool = True
    scale: float | None = None

    def for_layer(self, layer: int) -> "AttentionContext":
        return replace(self, layer=layer)


class InnerAttention(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor: ...


def base_mask(ctx: AttentionContext, extra: M.Mask | None = None) -> M.Mask:
    """Causal, restricted to documents when packed, intersected with ``extra``."""
    mask: M.Mask = M.causal() if ctx.cu_seqlens is None else M.documents(ctx.cu_seqlens)
    if extra is not None:
        mask = mask & extra.at(step=ctx.step, layer=ctx.layer)
    return mask


class LocalAttention:
    """Single-rank inner attention: causal (document-aware) softmax attention on one backend.

    ``train_mask`` (e.g. S2/SF/SSA) applies only while ``ctx.training``; evaluation is full causal.
    """

    def __init__(self, backend: str = "auto", train_mask: M.Mask | None = None) -> None:
        self.backend = backend
        self.train_mask = train_mask

    def __call__(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        s = q.shape[1]
        mask = base_mask(ctx, self.train_mask if ctx.training else None)
        seq_len = ctx.seq_len if ctx.seq_len is not None else s
        pos = ctx.positions if ctx.positions is not None else torch.arange(s)
        placed = mask.place(pos.cpu(), pos.cpu(), seq_len=seq_len, num_heads=q.shape[2])
        return local_attention_op(q, k, v, mask=placed, scale=ctx.scale, backend=self.backend)


InnerAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext], torch.Tensor]
