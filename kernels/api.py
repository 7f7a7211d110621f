"""``attention(q, k, v, *, mask, scale, backend, return_lse)``: dispatch to a local softmax backend.

Backends are modules offering ``forward``/``backward`` (framework/ARCHITECTURE.md §2), registered by
name and imported on first use so that ``import longreach.kernels`` stays light (no triton import).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

import torch

from .masks import Mask, PlacedMask

# name -> (module path, predicate(device) telling whether the backend can run here)
_BACKENDS: dict[str, tuple[str, Callable[[torch.device], bool]]] = {}


def register_backend(name: str, module: str, runs_on: Callable[[torch.device], bool]) -> None:
    """Register a local attention backend module (``forward``/``backward`` functions)."""
    _BACKENDS[name] = (module, runs_on)


def _cpu(dev: torch.device) -> bool:
    return dev.type == "cpu"


def _any(dev: torch.device) -> bool:
    return True


def _cuda(dev: torch.device) -> bool:
    return dev.type == "cuda"


register_backend("reference", "longreach.kernels.dense.reference", _any)
register_backend("cpu", "longreach.kernels.dense.cpu", _cpu)
register_backend("cpu_sparse", "longreach.kernels.blocksparse.cpu", _cpu)
register_backend("slices", "longreach.kernels.slices.cpu", _cpu)
register_backend("triton", "longreach.kernels.blocksparse.triton", _any)
register_backend("flex", "longreach.kernels.blocksparse.flex", _cuda)
register_backend("flash", "longreach.kernels.dense.flash", _cuda)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> ModuleType:
    """The backend module called ``name``; raises naming the valid choices."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {available_backends()} or 'auto'")
    return importlib.import_module(_BACKENDS[name][0])


def resolve_backend(name: str, q: torch.Tensor, mask: Mask | PlacedMask | None) -> str:
    """Pick the backend for ``auto``: the fastest correct one for device, dtype and mask.

    This is the one meaning of ``auto``, for local attention and for every context-parallel strategy
    (which asks it once per call, for the mask intersected with causal):

    * CPU: ``cpu`` — PyTorch's CPU flash kernel: one call for no mask and aligned causal masks, any
      other mask as its slice plan (:mod:`longreach.kernels.slices`: batched dense calls of that kernel);
    * CUDA: ``reference`` for float64, else ``flash`` — flash-attn's varlen API when installed, else
      PyTorch SDPA, for unmasked, causal and masked attention alike (masks run as slice plans).

    The block-sparse kernels (``cpu_sparse``, ``triton``, ``flex``) are opt-in by name.
    """
    if name != "auto":
        get_backend(name)
        return name
    if q.device.type == "cuda":
        return "reference" if q.dtype == torch.float64 else "flash"
    return "cpu"


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, backend_name):
        backend = get_backend(backend_name)
        out, lse = backend.forward(q, k, v, mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.backend_name = mask, scale, backend_name
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        backend = get_backend(ctx.backend_name)
        dq, dk, dv = backend.backward(dout, q, k, v, out, lse, mask=ctx.mask, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def attention(q, k, v, *, mask=None, scale=None, backend="auto", return_lse=False):
    """Softmax attention on one rank.

    Args:
        q: ``[B, Sq, H, D]``; k: ``[B, Sk, Hkv, D]``; v: ``[B, Sk, Hkv, E]`` (H a multiple of Hkv).
        mask: a :mod:`longreach.kernels.masks` mask (global positions: keys 0..Sk-1, queries aligned
            to the end of the keys) or a :class:`PlacedMask`; None means full, non-causal attention.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cpu_sparse"``, ``"slices"``, ``"triton"``,
            ``"flex"``, ``"flash"``.
        return_lse: also return the log-sum-exp (not differentiable).

    Returns:
        out ``[B, Sq, H, E]``, or ``(out, lse)`` with lse ``[B, H, Sq]`` float32 (−inf for rows with
        no allowed key).
    """
    name = resolve_backend(backend, q, mask)
    out, lse = _Attention.apply(q, k, v, mask, scale, name)
    return (out, lse) if return_lse else out
