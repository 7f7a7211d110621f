"""``flash``: attention on CUDA through flash-attn's varlen API when installed, else PyTorch SDPA.

Masks run as slice plans (:mod:`longreach.kernels.slices`): each bucket of equal-shaped full or causal
units is ONE ``flash_attn_varlen_func`` call, the units packed along the token axis with uniform
``cu_seqlens`` (causal units are square, so flash-attn's bottom-right ``causal`` is exact), its LSE returned
with ``return_attn_probs=True``. The backward of a unit must use the *global* out and lse (context
parallelism), which flash-attn's public autograd cannot take, so it calls
``flash_attn.flash_attn_interface._flash_attn_varlen_backward``; its signature changed across releases
(``window_size`` became ``window_size_left``/``_right``, ``softcap`` appeared), so arguments are passed by
the names the installed version declares. Band units run with flash-attn's own ``window_size`` (the
executor hands their window beside the mask). Units flash-attn cannot run (explicit tile masks, float32)
go to PyTorch's memory-efficient SDPA kernel (``aten._scaled_dot_product_efficient_attention`` and its
backward, which take an LSE); on a CPU tensor (tests with a stand-in ``flash_attn``) to the CPU flash kernel.

Same contract as :mod:`.reference`.
"""
from __future__ import annotations

import importlib
import inspect
from functools import lru_cache, partial

import torch

from ..slices import cpu as slices_cpu

__all__ = ["forward", "backward", "FlashRunner", "flash_available"]

#: dtypes flash-attn's kernels take (tests with the stand-in widen this).
FLASH_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def _flash_module():
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


def flash_available() -> bool:
    """True when ``flash_attn`` imports (on this machine or as a test stand-in)."""
    return _flash_module() is not None


def _varlen_backward(fa, **kw):
    """``_flash_attn_varlen_backward`` with the keyword names the installed flash-attn declares."""
    fn = importlib.import_module(fa.__name__ + ".flash_attn_interface")._flash_attn_varlen_backward
    names = inspect.signature(fn).parameters
    if "window_size" in names:
        kw["window_size"] = (kw["window_size_left"], kw["window_size_right"])
    return fn(**{k: v for k, v in kw.items() if k in names})


class SdpaRunner:
    """Units on ``aten._scaled_dot_product_efficient_attention`` (CUDA; GQA by expanding K/V per call)."""

    @staticmethod
    @lru_cache(maxsize=8)
    def _lse_len(device: str, m: int) -> int:
        # the kernel pads its LSE to an alignment that changed across releases: ask it once per length
        x = torch.zeros(1, 1, m, 8, device=device, dtype=torch.float16)
        return torch.ops.aten._scaled_dot_product_efficient_attention(x, x, x, None, True)[1].shape[-1]

    @staticmethod
    def _bias(mask, dtype, hg):
        if mask is None:
            return None
        n = mask.shape[-1]
        pad = (n + 15) // 16 * 16  # the kernel wants the bias rows 16-element aligned
        bias = torch.zeros(*mask.shape[:-1], pad, dtype=dtype, device=mask.device)[..., :n]
        return bias.masked_fill_(~mask, float("-inf")).expand(mask.shape[0], hg, *mask.shape[2:])

    def forward(self, q, k, v, *, causal, mask, scale, window=None):  # window: the mask says it
        rep = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(rep, 1) if rep > 1 else x for x in (k, v))
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, self._bias(mask, q.dtype, q.shape[1]), True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., : q.shape[2]].float()
        if mask is not None:
            empty = (~mask.any(-1)).expand(lse.shape)
            lse, out = lse.masked_fill(empty, float("-inf")), out.masked_fill(empty[..., None], 0.0)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, mask, scale, window=None):
        n, hk, rep = k.shape[0], k.shape[1], q.shape[1] // k.shape[1]
        ke, ve = (x.repeat_interleave(rep, 1) if rep > 1 else x for x in (k, v))
        width = self._lse_len(str(q.device), q.shape[2])
        lse_p = torch.nn.functional.pad(lse.float(), (0, width - lse.shape[-1])).contiguous()
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.contiguous(), q, ke, ve, self._bias(mask, q.dtype, q.shape[1]), out.contiguous(), lse_p, seed, seed,
            0.0, [True, True, True, False], causal, scale=scale)[:3]
        if rep > 1:
            dk = dk.view(n, hk, rep, *dk.shape[2:]).sum(2)
            dv = dv.view(n, hk, rep, *dv.shape[2:]).sum(2)
        return dq, dk, dv


class FlashRunner:
    """Units on flash-attn's varlen kernel (one call per bucket), falling back per unit as described above."""

    def __init__(self) -> None:
        self.sdpa, self.cpu = SdpaRunner(), slices_cpu.CpuRunner()

    def _fallback(self, q):
        return self.cpu if q.device.type == "cpu" else self.sdpa

    @staticmethod
    def _pack(x):
        """``[N, H, S, D]`` → ``[N·S, H, D]`` and its ``cu_seqlens`` (int32)."""
        n, h, s, d = x.shape
        cu = torch.arange(0, (n + 1) * s, s, dtype=torch.int32, device=x.device)
        return x.transpose(1, 2).reshape(n * s, h, d), cu

    def _usable(self, q, mask, window):
        """flash-attn runs the unit: no mask, or a band mask given as its window (native in flash-attn)."""
        return (mask is None or window is not None) and q.dtype in FLASH_DTYPES and _flash_module() is not None

    def forward(self, q, k, v, *, causal, mask, scale, window=None):
        if not self._usable(q, mask, window):
            return self._fallback(q).forward(q, k, v, causal=causal, mask=mask, scale=scale)
        left, right = window if window is not None else (-1, -1)
        n, h, m, _ = q.shape
        sk = k.shape[2]
        (qp, cu_q), (kp, cu_k), (vp, _) = self._pack(q), self._pack(k), self._pack(v)
        out, lse, _ = _flash_module().flash_attn_varlen_func(
            qp, kp, vp, cu_q, cu_k, m, sk, dropout_p=0.0, softmax_scale=scale, causal=causal,
            window_size=(left, right), return_attn_probs=True)
        out = out.view(n, m, h, -1).transpose(1, 2)  # [N, H, m, E]
        # LSE is [H, total_q] in current releases, [N, H, max_seqlen_q] in older ones
        lse = lse.view(h, n, m).transpose(0, 1) if lse.dim() == 2 else lse[..., :m]
        return out, lse.float()

    def backward(self, dout, q, k, v, out, lse, *, causal, mask, scale, window=None):
        if not self._usable(q, mask, window):
            return self._fallback(q).backward(dout, q, k, v, out, lse, causal=causal, mask=mask, scale=scale)
        left, right = window if window is not None else (-1, -1)
        n, h, m, _ = q.shape
        sk = k.shape[2]
        (qp, cu_q), (kp, cu_k), (vp, _) = self._pack(q), self._pack(k), self._pack(v)
        dop, op = self._pack(dout)[0], self._pack(out)[0]
        lse_p = lse.float().transpose(0, 1).reshape(h, n * m).contiguous()  # [H, total_q]
        dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
        _varlen_backward(
            _flash_module(), dout=dop, q=qp, k=kp, v=vp, out=op, softmax_lse=lse_p, dq=dq, dk=dk, dv=dv,
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=m, max_seqlen_k=sk, dropout_p=0.0,
            softmax_scale=scale, causal=causal, window_size_left=left, window_size_right=right, softcap=0.0,
            alibi_slopes=None, deterministic=False, rng_state=None,
        )
        return (dq.view(n, m, h, -1).transpose(1, 2), dk.view(n, sk, -1, dk.shape[-1]).transpose(1, 2),
                dv.view(n, sk, -1, dv.shape[-1]).transpose(1, 2))


RUNNER = FlashRunner()

#: ``forward(q, k, v, *, mask, scale) -> (out [B, Sq, H, E], lse [B, H, Sq] float32)``.
forward = partial(slices_cpu.forward, runner=RUNNER)
#: ``backward(dout, q, k, v, out, lse, *, mask, scale, grad_dtype=None) -> (dq, dk, dv)`` given the *global* out
#: and lse (float32 ``grad_dtype`` of bf16 inputs runs every unit in float32: SDPA, not flash-attn).
backward = partial(slices_cpu.backward, runner=RUNNER)
