"""Chunked cross-entropy: the loss without ever materialising ``[S, V]`` logits (ARCHITECTURE.md §4).

1M tokens × 128k vocabulary of float32 logits is 512 GB, so logits are formed ``chunk_size`` tokens at a
time, in forward and again in backward (recomputed, not saved): memory is O(chunk × V). Accumulation is
float32 whatever the hidden dtype. The loss is a *sum* over this rank's tokens plus the count of
non-ignored labels; the trainer divides by the global count (:func:`global_token_count`) so that every
rank's gradient is its exact share of the global mean.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                ignore_index: int) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
        y = labels.reshape(-1)  # [N]
        acc = torch.promote_types(h.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=h.device)
        lse = torch.empty(y.shape[0], dtype=acc, device=h.device)  # [N]: kept for backward (O(N), not O(N·V))
        w = weight.to(acc)
        for start in range(0, y.shape[0], chunk_size):
            hc, yc = h[start:start + chunk_size].to(acc), y[start:start + chunk_size]
            logits = hc @ w.t()  # [C, V]
            lse_c = torch.logsumexp(logits, dim=-1)  # [C]
            valid = yc != ignore_index
            target = logits.gather(1, yc.clamp(min=0).unsqueeze(1)).squeeze(1)  # [C]
            total += torch.where(valid, lse_c - target, torch.zeros_like(lse_c)).sum()
            lse[start:start + chunk_size] = lse_c
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size, ctx.ignore_index = chunk_size, ignore_index
        return total

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
        y = labels.reshape(-1)  # [N]
        acc = lse.dtype
        w = weight.to(acc)  # [V, D]
        dh = torch.empty(h.shape, dtype=hidden.dtype, device=h.device) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        g = grad_total.to(acc)
        for start in range(0, y.shape[0], ctx.chunk_size):
            hc, yc = h[start:start + ctx.chunk_size].to(acc), y[start:start + ctx.chunk_size]
            valid = yc != ctx.ignore_index
            # d(lse − logit_y)/dlogits = softmax − onehot(y), zero on ignored rows
            p = torch.exp(hc @ w.t() - lse[start:start + ctx.chunk_size, None])  # [C, V]
            p.scatter_add_(1, yc.clamp(min=0).unsqueeze(1), -torch.ones_like(p[:, :1]))
            p.mul_((valid.to(acc) * g).unsqueeze(1))
            if dh is not None:
                dh[start:start + ctx.chunk_size] = (p @ w).to(dh.dtype)  # [C, D]
            if dw is not None:
                dw.addmm_(p.t(), hc)  # [V, D]
        return (dh.view_as(hidden) if dh is not None else None,
                dw.to(weight.dtype) if dw is not None else None, None, None, None)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``labels``, chunk by chunk.

    Args:
        hidden: ``[B, S, D]`` final hidden states (after the last norm).
        weight: ``[V, D]`` output projection.
        labels: ``[B, S]`` target ids, already shifted on the global sequence; ``ignore_index`` skips a token.
        chunk_size: tokens per logits chunk (memory O(chunk_size × V)).
        ignore_index: label value that contributes nothing.

    Returns:
        ``(loss_sum, n_tokens)``: float32 (float64 for float64 input) scalar sum of the losses, and the
        int64 scalar count of non-ignored labels on this rank.
    """
    if chunk_size < 1:
        raise ValueError(f"train.loss_chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [B, S]")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != output weight's {weight.shape[-1]}")
    n_tokens = (labels != ignore_index).sum()
    loss_sum = _ChunkedCrossEntropy.apply(hidden, weight, labels, int(chunk_size), int(ignore_index))
    return loss_sum, n_tokens


def global_token_count(n: torch.Tensor | int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of ``n`` over ``group`` (the whole dp × cp group; WORLD by default; unchanged without a group).

    Returns:
        int64 scalar tensor (on ``n``'s device when ``n`` is a tensor).
    """
    t = n.detach().clone().to(torch.int64) if isinstance(n, torch.Tensor) else torch.tensor(int(n), dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
