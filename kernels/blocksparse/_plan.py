"""Tile plans shared by the block-sparse backends: which (query tile, key tile) pairs to compute.

A plan is built once per call from a :class:`~longreach.kernels.masks.PlacedMask` (global positions):
the tile classification ``kind [Hm, nQ, nK]`` (EMPTY/PARTIAL/FULL), per-row and per-column lists of the
non-empty tiles (what the kernels loop over) and, for the Triton kernel, the elementwise pattern of the
PARTIAL tiles only, packed as ``[P, BM, BN]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import EMPTY, PARTIAL, PlacedMask


@dataclass(kw_only=True, slots=True)
class TilePlan:
    """Non-empty tiles of one attention call.

    Attributes:
        kind: ``int8 [Hm, nQ, nK]`` tile classes (Hm = 1 for head-independent masks, else local heads).
        row_list: ``int32 [Hm, nQ, nK]`` key tiles of each query tile, non-empty ones first, ascending.
        row_count: ``int32 [Hm, nQ]`` number of non-empty key tiles per query tile.
        col_list: ``int32 [Hm, nK, nQ]`` query tiles of each key tile, non-empty first.
        col_count: ``int32 [Hm, nK]``.
        partial_index: ``int32 [Hm, nQ, nK]`` row of ``partial_mask`` for PARTIAL tiles, −1 elsewhere.
        partial_mask: ``int8 [P, BM, BN]`` elementwise pattern of each PARTIAL tile (0 outside Sq/Sk).
    """

    kind: torch.Tensor
    row_list: torch.Tensor
    row_count: torch.Tensor
    col_list: torch.Tensor
    col_count: torch.Tensor
    partial_index: torch.Tensor | None = None
    partial_mask: torch.Tensor | None = None


def _lists(kind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nonempty = kind != EMPTY  # [Hm, R, C]
    # stable sort puts non-empty tiles first, each group in ascending tile order
    order = torch.sort((~nonempty).to(torch.int8), dim=-1, stable=True).indices
    return order.to(torch.int32).contiguous(), nonempty.sum(-1).to(torch.int32).contiguous()


def build_plan(
    placed: PlacedMask, sq: int, sk: int, heads: int, block_q: int, block_k: int, *, with_partial: bool
) -> TilePlan:
    """Classify the tiles of ``placed`` (and pack PARTIAL tiles' patterns when ``with_partial``).

    Args:
        placed: the mask bound to the Sq query and Sk key global positions.
        heads: local query head count.
        block_q, block_k: tile sizes.
        with_partial: also build ``partial_index``/``partial_mask``.
    """
    kind = placed.block_map(heads, block_q, block_k).to(torch.int8).contiguous()  # [Hm, nQ, nK]
    row_list, row_count = _lists(kind)
    col_list, col_count = _lists(kind.transpose(1, 2))
    plan = TilePlan(kind=kind, row_list=row_list, row_count=row_count, col_list=col_list, col_count=col_count)
    if not with_partial:
        return plan
    hm, nq, nk = kind.shape
    entries = (kind == PARTIAL).nonzero()  # [P, 3] (hm, qt, kt), sorted by hm then qt
    p = entries.shape[0]
    pidx = torch.full((hm, nq, nk), -1, dtype=torch.int32)
    pidx[entries[:, 0], entries[:, 1], entries[:, 2]] = torch.arange(p, dtype=torch.int32)
    pmask = torch.zeros(max(p, 1), block_q, block_k, dtype=torch.int8)
    for qt in entries[:, 1].unique().tolist():
        sel = entries[:, 1] == qt
        kts = entries[sel, 2].unique()  # sorted key tiles partial in this row (any head)
        q_lo, q_hi = qt * block_q, min(sq, (qt + 1) * block_q)
        kidx = torch.cat([torch.arange(t * block_k, min(sk, (t + 1) * block_k)) for t in kts.tolist()])
        dense = placed.slice(slice(q_lo, q_hi), kidx).dense(heads)  # [Hd, mq, len(kidx)]
        slot = torch.searchsorted(kts, kidx // block_k)  # position of each key's tile in kts
        col = slot * block_k + kidx % block_k
        tmp = torch.zeros(dense.shape[0], block_q, kts.numel() * block_k, dtype=torch.bool)
        tmp[:, : q_hi - q_lo, col] = dense
        tmp = tmp.view(dense.shape[0], block_q, kts.numel(), block_k).permute(0, 2, 1, 3)  # [Hd, nt, BM, BN]
        ent = entries[sel]
        hsel = ent[:, 0] if dense.shape[0] > 1 else torch.zeros_like(ent[:, 0])
        pmask[pidx[ent[:, 0], ent[:, 1], ent[:, 2]].long()] = tmp[hsel, torch.searchsorted(kts, ent[:, 2].contiguous())].to(torch.int8)
    plan.partial_index = pidx.contiguous()
    plan.partial_mask = pmask.contiguous()
    return plan


def head_groups(kind: torch.Tensor, heads: int) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """Group local heads whose tile classes agree: ``[(head index or None for all, kind [nQ, nK])]``."""
    if kind.shape[0] == 1:
        return [(None, kind[0])]
    flat = kind.reshape(kind.shape[0], -1)
    uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)
    if uniq.shape[0] == 1:
        return [(None, kind[0])]
    return [((inverse == g).nonzero().reshape(-1), uniq[g].view(kind.shape[1:])) for g in range(uniq.shape[0])]
