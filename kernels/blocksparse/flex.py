"""``flex``: FlexAttention backend (``torch.nn.attention.flex_attention``), meant for GPUs.

The block mask is built from our own tile plan (:func:`._plan.build_plan`): FULL tiles need no mask_mod,
EMPTY tiles are skipped, and the mask_mod reads only the packed patterns of the PARTIAL tiles
(``partial_mask [P, 128, 128]`` through ``partial_index [Hm, nQ, nK]``) — never an S×S tensor — so any
:mod:`~longreach.kernels.masks` mask works, per head included. Block masks and their mask_mod are cached
per (mask, shapes, positions, device), so the compiled kernel is reused by every layer and step instead of
being traced again for a new closure. On CUDA the op is compiled once per process; elsewhere it runs
eagerly (slow, for tests only).

``backward`` must honour the *global* out/lse (context parallelism): it re-runs the local forward under
autograd and feeds it ``dout·w`` and ``w·(δ_local − δ_global)`` as the gradients of the local out and
lse, with ``w = exp(lse_local − lse_global)`` and ``δ = rowsum(dout ⊙ out)``; that yields exactly
``dS = P_global ⊙ (dP − δ_global)``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..dense.reference import check_shapes
from ..masks import FULL, PARTIAL, Mask, PlacedMask, full, place
from ..slices.plan import PlanCache
from ._plan import build_plan

__all__ = ["forward", "backward", "BLOCK"]

#: FlexAttention's tile size (its default).
BLOCK = 128


@lru_cache(maxsize=1)
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def _kv_lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices
    return sel.sum(-1).to(torch.int32)[None], order.to(torch.int32)[None]  # [1, Hm, nQ], [1, Hm, nQ, nK]


_BLOCK_MASKS = PlanCache(16)


def _empty_rows(plan, sq: int) -> torch.Tensor:
    """``bool [Hm, Sq]``: rows with no allowed key (no FULL tile and no allowed pair in a PARTIAL one)."""
    hm, nq, _ = plan.kind.shape
    has = (plan.kind == FULL).any(-1).repeat_interleave(BLOCK, dim=1)  # [Hm, nQ·BLOCK]
    entries = (plan.kind == PARTIAL).nonzero()  # [P, 3]
    if entries.numel():
        rows = plan.partial_mask[plan.partial_index[entries[:, 0], entries[:, 1], entries[:, 2]].long()].any(-1)
        flat = (entries[:, 0] * nq * BLOCK + entries[:, 1] * BLOCK)[:, None] + torch.arange(BLOCK)  # [P, BLOCK]
        has = has.reshape(-1).index_put((flat.reshape(-1),), rows.reshape(-1), accumulate=True).view(hm, -1)
    return ~has[:, :sq]


def _block_mask(placed: PlacedMask, sq: int, sk: int, heads: int, device: torch.device):
    from torch.nn.attention.flex_attention import BlockMask

    def build():
        plan = build_plan(placed, sq, sk, heads, BLOCK, BLOCK, with_partial=True)
        per_head = plan.kind.shape[0] > 1
        pidx = plan.partial_index.to(device).long()  # [Hm, nQ, nK]: -1 outside PARTIAL tiles
        pmask = plan.partial_mask.to(device).bool()  # [P, BLOCK, BLOCK]
        full = (plan.kind == FULL).to(device)  # [Hm, nQ, nK]

        def mask_mod(b, h, q_idx, kv_idx):
            # only index arithmetic on tile-sized data; FULL tiles answer True if a kernel asks at all
            hm = h if per_head else 0
            qt, kt = q_idx // BLOCK, kv_idx // BLOCK
            tile = pidx[hm, qt, kt]
            return full[hm, qt, kt] | ((tile >= 0) & pmask[tile.clamp(min=0), q_idx % BLOCK, kv_idx % BLOCK])

        kv_num, kv_idx = _kv_lists(plan.kind == PARTIAL)
        full_num, full_idx = _kv_lists(plan.kind == FULL)
        bm = BlockMask.from_kv_blocks(
            kv_num.to(device), kv_idx.to(device), full_num.to(device), full_idx.to(device),
            BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(sq, sk),
        )
        empty = _empty_rows(plan, sq)
        return bm, (empty.to(device) if bool(empty.any()) else None)

    return _BLOCK_MASKS.get(placed, (sq, sk, heads, str(device)), build)


def _run(q, k, v, placed, scale):
    from torch.nn.attention.flex_attention import AuxRequest

    b, sq, h, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    bm, empty = _block_mask(placed, sq, sk, h, q.device)
    out, aux = _flex()(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, scale=scale,
        enable_gqa=hkv != h, return_aux=AuxRequest(lse=True),
    )
    lse = aux.lse.float()  # [B, H, Sq], natural log
    if empty is not None:  # rows with no allowed key: out 0, lse -inf (framework/ARCHITECTURE.md §2)
        e = empty[None].expand(b, h, sq)
        lse = lse.masked_fill(e, float("-inf"))
        out = out.masked_fill(e[..., None], 0.0)
    return out, lse  # out [B, H, Sq, E]


def _placed(q, k, mask) -> PlacedMask:
    sq, sk, h = q.shape[1], k.shape[1], q.shape[2]
    placed = place(mask, sq, sk, num_heads=h)
    if placed is None:
        placed = full().place(torch.arange(sk - sq, sk), torch.arange(sk), seq_len=sk)
    return placed


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Mask | PlacedMask | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention forward. Returns out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]`` float32."""
    check_shapes(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _run(q, k, v, _placed(q, k, mask), scale)
    return out.transpose(1, 2).contiguous(), lse


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, mask: Mask | PlacedMask | None = None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients given the *global* out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]`` of the query rows."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    placed = _placed(q, k, mask)
    qr, kr, vr = (x.detach().requires_grad_(True) for x in (q, k, v))
    with torch.enable_grad():
        o_l, lse_l = _run(qr, kr, vr, placed, scale)  # [B, H, Sq, E], [B, H, Sq]
        do = dout.transpose(1, 2).float()  # [B, H, Sq, E]
        lse_g = lse.float()
        w = torch.where(torch.isneginf(lse_g), torch.zeros_like(lse_g), torch.exp(lse_l.detach() - lse_g))
        w = torch.nan_to_num(w, nan=0.0)  # rows empty locally (lse_l = -inf) carry no gradient
        delta_l = (do * o_l.detach().float()).sum(-1)
        delta_g = (do * out.transpose(1, 2).float()).sum(-1)
        g_out = (do * w[..., None]).to(o_l.dtype)
        g_lse = (w * (delta_l - delta_g)).to(lse_l.dtype)
        dq, dk, dv = torch.autograd.grad([o_l, lse_l], [qr, kr, vr], [g_out, g_lse], allow_unused=True)
    zero = torch.zeros_like
    return (dq if dq is not None else zero(q)), (dk if dk is not None else zero(k)), (dv if dv is not None else zero(v))
