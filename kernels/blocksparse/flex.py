"""``flex``: FlexAttention backend (``torch.nn.attention.flex_attention``), meant for GPUs.

The block mask is built from our own tile classes (FULL tiles need no mask_mod, PARTIAL tiles read the
dense pattern, EMPTY tiles are skipped) and the mask_mod reads the elementwise pattern of the placed
mask, so any :mod:`~longreach.kernels.masks` mask works, per head included. On CUDA the op is compiled
once per process; elsewhere it runs eagerly (slow, for tests only).

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
from ..masks import FULL, PARTIAL, Mask, PlacedMask, _Full, place

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


def _block_mask(placed: PlacedMask, sq: int, sk: int, heads: int, device: torch.device):
    from torch.nn.attention.flex_attention import BlockMask

    kind = placed.block_map(heads, BLOCK, BLOCK)  # [Hm, nQ, nK]
    dense = placed.dense(heads).to(device)  # [Hm, Sq, Sk]
    per_head = dense.shape[0] > 1
    kv_num, kv_idx = _kv_lists(kind == PARTIAL)
    full_num, full_idx = _kv_lists(kind == FULL)

    if per_head:
        def mask_mod(b, h, q_idx, kv_idx):
            return dense[h, q_idx, kv_idx]
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return dense[0, q_idx, kv_idx]

    bm = BlockMask.from_kv_blocks(
        kv_num.to(device), kv_idx.to(device), full_num.to(device), full_idx.to(device),
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(sq, sk),
    )
    empty = ~dense.any(-1)  # [Hm, Sq]
    return bm, (empty if bool(empty.any()) else None)


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
    if empty is not None:  # rows with no allowed key: out 0, lse -inf (DESIGN.md §2)
        e = empty[None].expand(b, h, sq)
        lse = lse.masked_fill(e, float("-inf"))
        out = out.masked_fill(e[..., None], 0.0)
    return out, lse  # out [B, H, Sq, E]


def _placed(q, k, mask) -> PlacedMask:
    sq, sk, h = q.shape[1], k.shape[1], q.shape[2]
    placed = place(mask, sq, sk, num_heads=h)
    if placed is None:
        placed = _Full().place(torch.arange(sk - sq, sk), torch.arange(sk), seq_len=sk)
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
