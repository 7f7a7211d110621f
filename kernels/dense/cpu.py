"""CPU flash attention through ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward.

Same contract as :mod:`.reference`. The aten kernel wants ``[B, H, S, D]`` and its ``is_causal`` is
top-left aligned when Sq ≠ Sk, so one call serves no mask and aligned causal blocks; any other mask runs
as the slice plan of :mod:`longreach.kernels.slices` (full and causal units on the same kernel, explicit
masks only tile-sized), so no S×S mask is ever built.
"""
from __future__ import annotations

import math

import torch

from ..masks import Mask, PlacedMask, place
from ..masks.algebra import _Causal
from ..slices import cpu as slices_cpu
from ..slices.cpu import expand_kv, reduce_kv
from . import is_heads_major
from .reference import check_shapes, grad_compute_dtype

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


#: The memory order this kernel reads fastest: q/k/v stored ``[B, H, S, D]`` behind the logical ``[B, S, H, D]``
#: (each head's rows one dense block: a bf16 forward call about 0.9× the token-major time, float32 0.95–0.99×;
#: ``longreach bench kernels --suite layout``).
LAYOUT = "heads"


def _one_call(placed: PlacedMask | None, sq: int, sk: int) -> bool | None:
    """``is_causal`` when one kernel call computes the mask exactly (no mask, aligned causal), else None."""
    if placed is None:
        return False
    if isinstance(placed.mask, _Causal) and sq == sk and sq > 0:
        qp, kp = placed.q_pos, placed.k_pos
        if bool((qp == kp).all()) and bool((qp[1:] - qp[:-1] == 1).all()):
            return True
    return None


def _call(q: torch.Tensor, k: torch.Tensor, mask: Mask | PlacedMask | None,
          scale: float | None) -> tuple[float, PlacedMask | None, bool | None]:
    """(scale, the mask placed on this call, ``is_causal`` of the one kernel call or None: the slice plan)."""
    _, sq, h, d = q.shape
    sk = k.shape[1]
    placed = place(mask, sq, sk, num_heads=h)
    is_causal = _one_call(placed, sq, sk) if sq and sk else None
    return (1.0 / math.sqrt(d) if scale is None else scale), placed, is_causal


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    # the aten kernel wants one head size for q, k and v: zero-pad the smaller (zeros add nothing to
    # q·k and give zero output columns that are cut off again)
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Mask | PlacedMask | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_shapes(q, k, v)
    d, e = q.shape[-1], v.shape[-1]
    if d != e:
        width = max(d, e)
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        out, lse = forward(_pad_to(q, width), _pad_to(k, width), _pad_to(v, width), mask=mask, scale=scale)
        return out[..., :e].contiguous(), lse
    scale, placed, is_causal = _call(q, k, mask, scale)
    if is_causal is None:
        return slices_cpu.forward(q, k, v, mask=placed, scale=scale)
    out, lse = _fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal, scale=scale)
    out = out.transpose(1, 2)  # [B, Sq, H, E]
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    # heads-first q (the context-parallel layers' layout, :data:`LAYOUT`) gets out as the kernel wrote it
    return (out if is_heads_major(q) else out.contiguous()), lse


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, mask: Mask | PlacedMask | None = None, scale: float | None = None, grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *global* out and lse of its query rows.

    Returns dq ``[B, Sq, H, D]``, dk ``[B, Sk, Hkv, D]``, dv ``[B, Sk, Hkv, E]`` in ``grad_dtype`` (None: the
    input dtype). The aten kernel returns gradients in its input dtype (bf16 for bf16, although it
    accumulates in float32 inside), so float32 gradients of bf16 inputs run it on float32 copies of the
    inputs (exact: every bf16 value is a float32 value).
    """
    d, e = q.shape[-1], v.shape[-1]
    if d != e:
        width = max(d, e)
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        dq, dk, dv = backward(_pad_to(dout, width), _pad_to(q, width), _pad_to(k, width), _pad_to(v, width),
                              _pad_to(out, width), lse, mask=mask, scale=scale, grad_dtype=grad_dtype)
        return dq[..., :d], dk[..., :d], dv[..., :e]
    scale, placed, is_causal = _call(q, k, mask, scale)
    if is_causal is None:
        return slices_cpu.backward(dout, q, k, v, out, lse, mask=placed, scale=scale, grad_dtype=grad_dtype)
    cd = grad_compute_dtype(q.dtype, grad_dtype)
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    # exp(s - lse) with lse = -inf would be NaN; such rows have no allowed key anywhere, so any
    # finite lse gives them zero probability.
    lse_k = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    lse_k = lse_k.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    # dout and out as they come (the kernel reads any strides; a token-major dout is its own layout)
    dq, dk, dv = _bwd(
        dout.transpose(1, 2).to(q.dtype),
        q.transpose(1, 2), expand_kv(k.transpose(1, 2), q.shape[2]), expand_kv(v.transpose(1, 2), q.shape[2]),
        out.transpose(1, 2).to(q.dtype), lse_k, 0.0, is_causal, scale=scale,
    )
    hkv, gd = k.shape[2], grad_dtype or cd
    return (dq.transpose(1, 2).to(gd), reduce_kv(dk, hkv).transpose(1, 2).to(gd),
            reduce_kv(dv, hkv).transpose(1, 2).to(gd))
