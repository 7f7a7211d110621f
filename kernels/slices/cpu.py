"""``slices``: masks as batched dense attention on CPU, on PyTorch's CPU flash kernel.

The runner calls ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward) once per bucket
of a :mod:`.plan`; ``is_causal`` there is top-left aligned, which the plan's square causal units satisfy.
Same contract as :mod:`longreach.kernels.dense.reference`: q ``[B, Sq, H, D]``, k ``[B, Sk, Hkv, D]``,
v ``[B, Sk, Hkv, E]``; out ``[B, Sq, H, E]``; lse ``[B, H, Sq]`` float32 (float64 for float64 inputs),
rows with no allowed key out = 0, lse = −inf.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..dense.reference import check_shapes
from ..masks import Mask, PlacedMask, _Full, place
from . import executor

__all__ = ["forward", "backward", "CpuRunner", "placed_or_full", "expand_kv", "reduce_kv"]

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


#: Additive forms of masks shared by every unit of a call (band masks), keyed by where the bool mask lives;
#: each entry holds the bool mask's storage, so the key cannot come to name another mask.
_SHARED: OrderedDict[tuple, tuple[object, torch.Tensor]] = OrderedDict()


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool mask ``[N, Hd, m, n]`` → additive (0 / −inf); a mask shared by all N (stride 0) stays shared and
    its additive form is built once."""
    if mask is None:
        return None
    if mask.shape[0] == 1 or mask.stride(0) == 0:
        store = mask.untyped_storage()
        key = (store.data_ptr(), mask.storage_offset(), tuple(mask.shape[1:]), mask.stride()[1:], dtype, mask.device)
        if key not in _SHARED:
            _SHARED[key] = (store, torch.zeros(mask.shape[1:], dtype=dtype, device=mask.device)
                            .masked_fill_(~mask[0], float("-inf")))
            while len(_SHARED) > 8:
                _SHARED.popitem(last=False)
        return _SHARED[key][1].expand(mask.shape)
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))  # [N, Hd, m, n]


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[N, Hk, S, D]`` → ``[N, heads, S, D]``: the CPU kernel's backward is pathologically slow with GQA
    (a fixed ~1 s per call in torch 2.13), so K/V heads are repeated per call and their gradients summed."""
    rep = heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def reduce_kv(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the gradients of repeated K/V heads: ``[N, H, S, D]`` → ``[N, kv_heads, S, D]``."""
    rep = g.shape[1] // kv_heads
    return g if rep == 1 else g.view(g.shape[0], kv_heads, rep, *g.shape[2:]).sum(2)


class CpuRunner:
    """Bucket runner on the aten CPU flash kernel (``[N, H, S, D]`` inputs)."""

    def forward(self, q, k, v, *, causal, mask, scale, window=None):  # window: the mask says it
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
        out, lse = _fwd(q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale)[:2]
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        if mask is not None:  # the kernel gives lse = 0 for rows its mask leaves empty
            shared = mask.shape[0] > 1 and mask.stride(0) == 0
            empty = ~(mask[:1] if shared else mask).any(-1)  # [N | 1, Hd, m]
            if bool(empty.any()):
                empty = empty.expand(lse.shape)
                lse = lse.masked_fill(empty, float("-inf"))
                out = out.masked_fill(empty[..., None], 0.0)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, mask, scale, window=None):
        hk = k.shape[1]
        # the kernel reads strided inputs but copies dout unless it is contiguous as [N, m, H, E] (its layout)
        dout = dout.transpose(1, 2).contiguous().transpose(1, 2)
        dq, dk, dv = _bwd(dout, q, expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1]), out, lse, 0.0, causal,
                          attn_mask=_additive(mask, q.dtype), scale=scale)[:3]
        return dq, reduce_kv(dk, hk), reduce_kv(dv, hk)


RUNNER = CpuRunner()


def placed_or_full(mask: Mask | PlacedMask | None, sq: int, sk: int, h: int) -> PlacedMask:
    """The mask argument placed on local positions (None: full attention, queries at the end of the keys)."""
    placed = place(mask, sq, sk, num_heads=h)
    if placed is None:
        placed = _Full().place(torch.arange(sk - sq, sk), torch.arange(sk), seq_len=sk)
    return placed


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    # the CPU flash kernel wants one head size: zero columns add nothing to q·k and give zero outputs
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Mask | PlacedMask | None = None,
    scale: float | None = None, runner=RUNNER, tiles: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out ``[B, Sq, H, E]`` (q dtype) and lse ``[B, H, Sq]``."""
    check_shapes(q, k, v)
    b, sq, h, d = q.shape
    sk, e = k.shape[1], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if sq == 0 or sk == 0:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_zeros(b, sq, h, e), torch.full((b, h, sq), float("-inf"), dtype=acc, device=q.device)
    w = max(d, e)
    out, lse = executor.forward(_pad(q, w), _pad(k, w), _pad(v, w), placed_or_full(mask, sq, sk, h), scale, runner,
                                tiles=tiles)
    return out[..., :e].contiguous(), lse


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, mask: Mask | PlacedMask | None = None, scale: float | None = None, runner=RUNNER, tiles: bool = False,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients given the *global* out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]`` of the query rows.

    Returns dq, dk, dv shaped like q, k, v, in ``grad_dtype`` (None: the input dtypes); float32 gradients
    of bf16 inputs run every unit on float32 inputs and sum them unrounded (:func:`executor.backward`).
    """
    b, sq, h, d = q.shape
    sk, e = k.shape[1], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if sq == 0 or sk == 0:
        return tuple(torch.zeros_like(x, dtype=grad_dtype or x.dtype) for x in (q, k, v))  # type: ignore[return-value]
    w = max(d, e)
    dq, dk, dv = executor.backward(_pad(dout, w), _pad(q, w), _pad(k, w), _pad(v, w), _pad(out, w), lse,
                                   placed_or_full(mask, sq, sk, h), scale, runner, tiles=tiles, grad_dtype=grad_dtype)
    return dq[..., :d].contiguous(), dk[..., :d].contiguous(), dv[..., :e].contiguous()
