"""The one stable merge of partial attention results (ring-flash-attention's ``_update_out_and_lse`` form).

Every piece of longreach that combines attention over disjoint key sets — ring steps, hybrid
ring groups, the CPU block-sparse path — calls :func:`merge_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_attention(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's (out, lse) into a running (out, lse), in float32.

    Args:
        out: running output ``[B, S, H, D]`` float32, or None for the first block.
        lse: running log-sum-exp ``[B, H, S]`` float32, or None.
        block_out: ``[B, S, H, D]`` output of attention over one disjoint key set.
        block_lse: ``[B, H, S]``; ``-inf`` where the block allowed no key for a row.

    Returns:
        ``(out, lse)`` float32. Rows empty on both sides stay out = 0, lse = −inf.
    """
    block_out = block_out.to(torch.float32) if block_out.dtype not in (torch.float32, torch.float64) else block_out
    block_lse = block_lse.to(block_out.dtype)
    if out is None:
        return block_out.clone(), block_lse.clone()
    lse_t = lse.transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    blse_t = block_lse.transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    # Stable form: O <- O - sigmoid(Lb - L) (O - Ob);  L <- L - logsigmoid(L - Lb).
    # An empty side (lse = -inf) makes these NaN, so it is guarded explicitly.
    new_out = out - torch.sigmoid(blse_t - lse_t) * (out - block_out)
    new_lse = lse - F.logsigmoid(lse - block_lse)
    a_empty = torch.isneginf(lse)
    b_empty = torch.isneginf(block_lse)
    new_lse = torch.where(b_empty, lse, torch.where(a_empty, block_lse, new_lse))
    a_empty_t = a_empty.transpose(1, 2).unsqueeze(-1)
    b_empty_t = b_empty.transpose(1, 2).unsqueeze(-1)
    new_out = torch.where(b_empty_t, out, torch.where(a_empty_t, block_out.to(out.dtype), new_out))
    return new_out, new_lse
