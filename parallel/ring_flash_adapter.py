"""The GPU path: ring-flash-attn behind one adapter with a version check (framework/ARCHITECTURE.md §5).

Used by ``cp_attention`` on CUDA for what ring-flash-attn covers — fp16/bf16, no extra mask:
``ring`` with ``zigzag`` (zigzag ring), ``stripe`` (striped) or ``contiguous`` layouts, causal or not.
Everything else (masks, Ulysses, hybrid, all-gather, CPU) runs longreach's own implementation.

ring-flash-attn's package ``__init__`` imports its HuggingFace adapters, which fail under
transformers 5.x, and every module needs flash-attn. So nothing is imported at module import; the
submodules are loaded on first use under a private package alias (their relative imports resolve
there) without running the package ``__init__``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from functools import lru_cache

import torch

# ring-flash-attn versions whose private call conventions this adapter was written against.
TESTED_VERSIONS = ((0, 1, 0), (0, 2, 0))  # [min, max)
_ALIAS = "longreach_rfa_private"


def _version(dist_name: str) -> tuple[int, ...] | None:
    try:
        v = importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


@lru_cache(maxsize=1)
def available() -> bool:
    """ring-flash-attn (a tested version) and flash-attn are installed and CUDA is usable."""
    if not torch.cuda.is_available():
        return False
    v = _version("ring-flash-attn") or _version("ring_flash_attn")
    if v is None or not (TESTED_VERSIONS[0] <= v < TESTED_VERSIONS[1]):
        return False
    return importlib.util.find_spec("flash_attn") is not None


@lru_cache(maxsize=None)
def _module(name: str) -> types.ModuleType:
    """Load ``ring_flash_attn.<name>`` without its package ``__init__``."""
    spec = importlib.util.find_spec("ring_flash_attn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("ring-flash-attn is not installed")
    if _ALIAS not in sys.modules:
        pkg = types.ModuleType(_ALIAS)
        pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
        sys.modules[_ALIAS] = pkg
    return importlib.import_module(f"{_ALIAS}.{name}")


def try_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str, layout, group,
                  causal: bool, mask, scale: float, return_lse: bool):
    """ring-flash-attn's result when it covers this call, else None (the caller uses its own path)."""
    if (mask is not None or strategy != "ring" or not isinstance(layout, str)
            or q.dtype not in (torch.float16, torch.bfloat16) or not available()):
        return None
    if not causal or layout == "contiguous":
        fn = _module("ring_flash_attn").ring_flash_attn_func
    elif layout == "zigzag":
        fn = _module("zigzag_ring_flash_attn").zigzag_ring_flash_attn_func
    elif layout == "stripe":
        fn = _module("stripe_flash_attn").stripe_flash_attn_func
    else:
        return None
    res = fn(q, k, v, softmax_scale=scale, causal=causal, group=group, return_attn_probs=return_lse)
    if return_lse:
        out, lse = res[0], res[1]
        return out, lse.float()
    return res
