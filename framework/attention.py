"""The model seam: one ``inner_attention(q, k, v, ctx)`` callable per attention layer (ARCHITECTURE.md §3).

Models are written for one device. An attention layer computes q, k, v (``[B, S_local, H, D]``),
applies positions, then calls ``self.inner_attention(q, k, v, ctx)``. Context parallelism, masks and
kernels are applied from outside by replacing that callable (the ``parallelize`` step), never by
branches inside model code.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from longreach.kernels import attention as local_attention_op
from longreach.kernels import masks as M
from longreach.parallel import cp_attention
from longreach.parallel.comm import CPGroup


@dataclass(frozen=True)
class AttentionContext:
    """What an inner attention needs to know beyond q, k, v.

    Attributes:
        layer: index of the layer (random masks and attention-aware routing read it).
        step: training step (SSA draws a fresh sample each step).
        seq_len: global sequence length (None: the local length, i.e. no context parallelism).
        positions: ``[S_local]`` global positions of the local tokens (None: 0..S_local-1).
        cu_seqlens: global document offsets of packed documents (None: one document): a ``[n+1]`` tensor
            shared by every batch row, or a tuple with one such tensor per row.
        training: False in evaluation (S2/SF/SSA fall back to full causal attention).
        scale: softmax scale (None: 1/sqrt(head_dim)); HF models pass their own.
    """

    layer: int = 0
    step: int = 0
    seq_len: int | None = None
    positions: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | tuple[torch.Tensor, ...] | None = None
    training: bool = True
    scale: float | None = None

    def for_layer(self, layer: int) -> "AttentionContext":
        return replace(self, layer=layer)


def base_mask(ctx: AttentionContext, extra: M.Mask | None = None) -> M.Mask:
    """Causal, restricted to documents when packed, intersected with ``extra``.

    A pattern that is not causal on purpose (LongLoRA's ``s2`` roll path wraps around: the first G/2
    queries of shifted heads see the sequence's tail) applies exactly as it is.
    """
    if extra is not None:
        extra = extra.at(step=ctx.step, layer=ctx.layer)
        if not extra.is_causal:
            return extra
    mask: M.Mask = M.causal() if ctx.cu_seqlens is None else M.documents(ctx.cu_seqlens)
    return mask if extra is None else mask & extra


def _rows(ctx: AttentionContext, batch: int) -> list[tuple[slice, AttentionContext]]:
    """Split a batch whose rows pack different documents into per-row calls (one mask per call)."""
    if isinstance(ctx.cu_seqlens, (tuple, list)):
        if len(ctx.cu_seqlens) != batch:
            raise ValueError(f"ctx.cu_seqlens has {len(ctx.cu_seqlens)} rows for a batch of {batch}")
        return [(slice(i, i + 1), replace(ctx, cu_seqlens=cu)) for i, cu in enumerate(ctx.cu_seqlens)]
    return [(slice(None), ctx)]


def _by_rows(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext], torch.Tensor],
             q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    parts = _rows(ctx, q.shape[0])
    if len(parts) == 1:
        return fn(q, k, v, parts[0][1])
    return torch.cat([fn(q[r], k[r], v[r], c) for r, c in parts], dim=0)  # [B, S, H, D]


_HOST_POSITIONS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _host_positions(pos: torch.Tensor) -> torch.Tensor:
    """Positions on the host, copied once per positions tensor (not once per layer: a device sync each)."""
    if pos.device.type == "cpu":
        return pos
    hit = _HOST_POSITIONS.get(id(pos))
    if hit is None or hit[0] is not pos:
        if len(_HOST_POSITIONS) >= 8:
            _HOST_POSITIONS.clear()
        hit = _HOST_POSITIONS[id(pos)] = (pos, pos.cpu())
    return hit[1]


class LocalAttention:
    """Single-rank inner attention: causal (document-aware) softmax attention on one backend.

    ``mask`` (window, sinks, power …) always applies; ``train_mask`` (S2/SF/SSA) applies only while
    ``ctx.training`` — evaluation then runs full causal attention.
    """

    def __init__(self, backend: str = "auto", train_mask: M.Mask | None = None, mask: M.Mask | None = None) -> None:
        self.backend = backend
        self.train_mask = train_mask
        self.mask = mask

    def extra_mask(self, ctx: AttentionContext) -> M.Mask | None:
        """The pattern intersected with causal/documents for this call (None: plain causal)."""
        parts = [m for m in (self.mask, self.train_mask if ctx.training else None) if m is not None]
        if not parts:
            return None
        out = parts[0]
        for m in parts[1:]:
            out = out & m
        return out

    def _one(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        s = q.shape[1]
        mask = base_mask(ctx, self.extra_mask(ctx))
        seq_len = ctx.seq_len if ctx.seq_len is not None else s
        pos = _host_positions(ctx.positions) if ctx.positions is not None else torch.arange(s)
        placed = mask.place(pos, pos, seq_len=seq_len, num_heads=q.shape[2])
        return local_attention_op(q, k, v, mask=placed, scale=ctx.scale, backend=self.backend)

    def __call__(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        return _by_rows(self._one, q, k, v, ctx)


class ContextParallelAttention(LocalAttention):
    """Inner attention over a context-parallel group through ``longreach.parallel.cp_attention``.

    q, k, v hold this rank's tokens in ``layout``; masks are global (causal/documents ∩ pattern), so
    every strategy and layout computes the same attention as one rank would.
    """

    def __init__(self, *, strategy: str, layout: str, group: Any = None, ulysses_degree: int | None = None,
                 backend: str = "auto", train_mask: M.Mask | None = None, mask: M.Mask | None = None) -> None:
        """``group``: the cp process group, or a :class:`~longreach.parallel.comm.CPGroup` with the mesh's
        Ulysses sub-group (``ParallelDims.cp_groups``); :attr:`group` is always the whole cp group."""
        super().__init__(backend, train_mask, mask)
        self.strategy, self.layout, self.ulysses_degree = strategy, layout, ulysses_degree
        self.groups = group  # what cp_attention gets
        self.group = group.group if isinstance(group, CPGroup) else group

    def _one(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        extra = self.extra_mask(ctx)
        mask = None if ctx.cu_seqlens is None and extra is None else base_mask(ctx, extra)
        causal = mask is None or mask.is_causal  # a non-causal pattern (s2 roll) applies as it is
        return cp_attention(q, k, v, strategy=self.strategy, layout=self.layout, group=self.groups, causal=causal,
                            mask=mask, scale=ctx.scale, ulysses_degree=self.ulysses_degree, backend=self.backend)


PATTERNS = ("full", "s2", "s2_roll", "sf", "ssa", "window", "power", "sinks_window")


@dataclass(kw_only=True, slots=True)
class AttentionConfig:
    """The ``attention:`` section of a job: local backend and sparse pattern of softmax layers."""

    backend: str = "auto"
    """Local attention backend: auto, reference, cpu, slices, cpu_sparse, triton, flex, flash."""
    pattern: str = "full"
    """full (causal) | s2 | s2_roll | sf | ssa (training only) | window | power | sinks_window (always)."""
    group_size: int = 0
    """S2/SF group size G; 0 = train.seq_len // 4 (LongLoRA's N/4)."""
    sinks: int = 4
    """Sink tokens (sf, sinks_window)."""
    window: int = 1024
    """Sliding window (window, sinks_window)."""
    block: int = 64
    """Block size of the power pattern."""
    ssa_ratio: float = 0.25
    """SSA: share of key blocks sampled."""
    ssa_window: int = 2
    """SSA: always-kept local window, in blocks of ``ssa_block`` tokens."""
    ssa_block: int = 64
    """SSA: sampling block size."""
    ssa_seed: int = 0
    """SSA: seed of the hash that draws the sample (per step, layer, head, block)."""
    ssa_bias: str = "local"
    """SSA: sampling bias."""
    eval_ensemble: int = 1
    """SSA evaluation: number of sampled masks averaged (1 = full attention at evaluation)."""

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"attention.pattern must be one of {', '.join(PATTERNS)}; got {self.pattern!r}")
        for name in ("sinks", "group_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"attention.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("window", "block", "ssa_window", "ssa_block", "eval_ensemble"):
            if getattr(self, name) < 1:
                raise ValueError(f"attention.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.ssa_ratio <= 1.0:
            raise ValueError(f"attention.ssa_ratio must be in (0, 1], got {self.ssa_ratio}")


def pattern_masks(cfg: AttentionConfig, seq_len: int) -> tuple[M.Mask | None, M.Mask | None]:
    """``(mask, train_mask)`` for ``cfg.pattern``: the always-on pattern and the training-only one.

    Args:
        cfg: the attention section.
        seq_len: global training sequence length (S2/SF default group size N/4).
    """
    group = cfg.group_size or max(1, seq_len // 4)
    p = cfg.pattern
    if p == "full":
        return None, None
    if p == "window":
        return M.sliding_window(cfg.window), None
    if p == "sinks_window":
        return M.sinks(cfg.sinks) | M.sliding_window(cfg.window), None
    if p == "power":
        return M.power(cfg.block), None
    if p == "s2":
        return None, M.s2(group, "varlen")
    if p == "s2_roll":
        return None, M.s2(group, "roll")
    if p == "sf":
        return None, M.sf(group, sinks=cfg.sinks)
    return None, M.ssa(cfg.ssa_ratio, window=cfg.ssa_window, block=cfg.ssa_block, seed=cfg.ssa_seed, bias=cfg.ssa_bias)

