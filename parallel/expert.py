"""Expert parallelism: all-to-all dispatch and combine of variable token counts.

The experts of an MoE layer are split over an expert-parallel (EP) group of P ranks: rank r holds the
``E_local = E / P`` consecutive experts ``r·E_local … (r+1)·E_local − 1``. Every rank routes its own
tokens (its data-parallel × context-parallel shard), sorts the (token, expert) assignments by expert —
which is also by destination rank — and exchanges them with one ``all_to_all_single`` whose split
sizes are the per-rank token counts. The receiving rank regroups what it got from (source rank,
expert) order into (expert, source rank) order so every local expert sees one contiguous segment,
runs its experts, and sends the results back with the inverse exchange.

Gradients flow through an explicit :class:`torch.autograd.Function`: the backward of an all-to-all
with splits (send, recv) is the all-to-all of the output gradient with the splits swapped.

The EP group may be any group, e.g. the whole dp × cp group: tokens of a context-parallel shard are
ordinary tokens to the experts (routing is per token), so EP composes with context parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import all_to_all_single

__all__ = ["all_to_all_variable", "exchange_counts", "ExpertDispatch", "dispatch_tokens", "combine_tokens"]


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _AllToAllVariable(torch.autograd.Function):
    """All-to-all of rows with per-rank split sizes; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))  # [sum(recv), ...]
        all_to_all_single(out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_out = grad_out.contiguous()
        grad_in = grad_out.new_empty((sum(ctx.send_splits),) + tuple(grad_out.shape[1:]))  # [sum(send), ...]
        all_to_all_single(grad_in, grad_out, output_split_sizes=ctx.send_splits,
                          input_split_sizes=ctx.recv_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_variable(
    x: torch.Tensor, *, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Differentiable all-to-all of a variable number of rows per rank.

    Args:
        x: ``[sum(send_splits), ...]`` rows ordered by destination rank.
        send_splits: rows sent to each rank (length P).
        recv_splits: rows received from each rank (length P), as returned by :func:`exchange_counts`.
        group: the expert-parallel group (default WORLD).

    Returns:
        ``[sum(recv_splits), ...]`` rows ordered by source rank.
    """
    p = _group_size(group)
    if len(send_splits) != p or len(recv_splits) != p:
        raise ValueError(f"all_to_all_variable needs {p} send and recv splits, got {len(send_splits)} and {len(recv_splits)}")
    if x.shape[0] != sum(send_splits):
        raise ValueError(f"all_to_all_variable: x has {x.shape[0]} rows but send_splits sum to {sum(send_splits)}")
    if p == 1:
        return x
    return _AllToAllVariable.apply(x, list(send_splits), list(recv_splits), group)


def exchange_counts(send_counts: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Tell every rank how many rows it will receive for each of its local experts.

    Args:
        send_counts: ``[P, E_local]`` int64, rows this rank sends to rank p for its local expert e.

    Returns:
        ``[P, E_local]`` int64, rows this rank receives from rank p for its own local expert e.
    """
    p = _group_size(group)
    if send_counts.dim() != 2 or send_counts.shape[0] != p:
        raise ValueError(f"exchange_counts expects [P={p}, E_local] counts, got {tuple(send_counts.shape)}")
    if p == 1:
        return send_counts.clone()
    send = send_counts.to(torch.int64).contiguous()
    recv = torch.empty_like(send)  # [P, E_local]
    all_to_all_single(recv, send, group=group)
    return recv


@dataclass(kw_only=True, slots=True)
class ExpertDispatch:
    """What :func:`dispatch_tokens` needs to undo its exchange in :func:`combine_tokens`."""

    send_splits: list[int]
    """Rows sent to each rank."""
    recv_splits: list[int]
    """Rows received from each rank."""
    recv_counts: torch.Tensor
    """``[P, E_local]`` rows received from rank p for local expert e."""
    order: torch.Tensor
    """``[M]`` permutation taking received rows (source-major) to expert-major order."""
    expert_counts: list[int]
    """Rows per local expert after regrouping (length E_local)."""


def dispatch_tokens(
    x_sorted: torch.Tensor, send_counts: torch.Tensor, *, group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, ExpertDispatch]:
    """Send expert-sorted rows to the ranks holding their experts; regroup them per local expert.

    Args:
        x_sorted: ``[N_assign, D]`` rows sorted by global expert id (hence by destination rank).
        send_counts: ``[P, E_local]`` rows for each (destination rank, local expert), in that order;
            must sum to ``N_assign``.
        group: the expert-parallel group.

    Returns:
        ``(x_local [M, D], plan)``: the rows this rank's experts must process, contiguous per local
        expert (``plan.expert_counts`` rows each), and the plan for :func:`combine_tokens`.
    """
    p, e_local = send_counts.shape
    recv_counts = exchange_counts(send_counts, group)  # [P, E_local]
    send_splits = send_counts.sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    received = all_to_all_variable(x_sorted, send_splits=send_splits, recv_splits=recv_splits, group=group)
    # received rows are (source rank, local expert)-major; regroup to (local expert, source rank)
    seg_expert = torch.arange(e_local).repeat(p)  # [P*E_local] expert of each (src, e) segment
    row_expert = torch.repeat_interleave(seg_expert, recv_counts.reshape(-1).cpu())  # [M]
    order = torch.argsort(row_expert, stable=True)  # [M]
    plan = ExpertDispatch(send_splits=send_splits, recv_splits=recv_splits, recv_counts=recv_counts,
                          order=order.to(x_sorted.device), expert_counts=recv_counts.sum(0).tolist())
    return received[plan.order], plan


def combine_tokens(y_local: torch.Tensor, plan: ExpertDispatch, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Inverse of :func:`dispatch_tokens`: return expert outputs to the ranks that own the tokens.

    Args:
        y_local: ``[M, D]`` expert outputs in the expert-major order :func:`dispatch_tokens` produced.
        plan: its plan.

    Returns:
        ``[N_assign, D]`` outputs in the original expert-sorted order of ``x_sorted``.
    """
    back = torch.empty_like(plan.order)
    back[plan.order] = torch.arange(plan.order.numel(), device=plan.order.device)
    y_src = y_local[back]  # [M, D] (source rank, local expert)-major again
    return all_to_all_variable(y_src, send_splits=plan.recv_splits, recv_splits=plan.send_splits, group=group)
