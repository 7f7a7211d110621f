"""Splitting a packed batch over the context-parallel group — the one implementation, used by the
trainer's ``prepare_batch``, the HF patch's ``sharded_batch`` and the evaluation helpers through them."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longreach.errors import UserError
from longreach.parallel.layouts import check_divisible, group_rank_size, positions_for, shard_sequence

__all__ = ["shard_batch"]

_SEQ_KEYS = ("input_ids", "labels", "position_ids")


def shard_batch(batch: dict[str, Any], layout: str, group: dist.ProcessGroup | None = None, *,
                context_parallel: bool = True) -> dict[str, Any]:
    """This rank's part of a packed batch under ``layout`` over the context-parallel ``group``.

    Labels were shifted on the global sequence by the loader, so sharding them with the inputs keeps
    every label the real next token whatever the layout.

    Args:
        batch: ``input_ids``, ``labels``, ``position_ids`` (``[B, S]``), ``cu_seqlens`` (``[n+1]`` or a
            list of B); other keys are passed through.
        layout: ``contiguous``, ``zigzag`` or ``stripe`` (``parallel.layout``).
        group: the context-parallel process group (None: WORLD, or no sharding without a process group).
        context_parallel: False means no context parallelism (``parallel.cp=1``): the whole sequence
            stays on this rank and ``group`` is not consulted — under data parallelism WORLD is the dp
            group, not a cp group, so "None = WORLD" would wrongly shard.

    Returns:
        A new dict: the three sequence tensors sharded along dim 1 (``[B, S / P]``); ``cu_seqlens``
        unchanged — document offsets stay GLOBAL, because masks are evaluated on global positions —
        and ``positions`` (``[S / P]``), the global position of each local token, for the attention
        context, and ``seq_len`` (the global S).

    Raises:
        UserError: the sequence length does not divide by what the layout needs on this group.
    """
    seq_len = batch["input_ids"].shape[1]
    out = dict(batch)
    out["seq_len"] = seq_len
    if not context_parallel:
        if group is not None:
            raise ValueError("shard_batch: context_parallel=False takes no group")
        out["positions"] = torch.arange(seq_len)  # [S]: nothing to shard, the layout does not apply
        return out
    rank, size = group_rank_size(group)
    try:
        check_divisible(seq_len, layout=layout, cp=size, setting="train.seq_len")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for key in _SEQ_KEYS:
        if key in batch and batch[key] is not None:
            out[key] = shard_sequence(batch[key], layout=layout, group=group, dim=1)  # [B, S / P]
    out["positions"] = positions_for(seq_len, layout, rank, size)  # [S / P]
    return out

