"""longreach.kernels — local (single-rank) attention operators and the mask algebra.

Public entry points (framework/ARCHITECTURE.md §2):

    attention(q, k, v, *, mask=None, scale=None, backend="auto", return_lse=False)
    masks.causal(), masks.sliding_window(w), masks.sinks(n), masks.documents(cu_seqlens), ...

This package imports nothing else of longreach.
"""
if __name__ != "longreach.kernels":  # pragma: no cover - guard against `kernels` shadowing on sys.path
    raise ImportError(
        f"longreach's kernels folder was imported as {__name__!r}; import it as 'longreach.kernels' "
        "(set PYTHONSAFEPATH=1 or run from outside the repository root)"
    )

from . import masks  # noqa: E402
from .api import attention, available_backends, get_backend  # noqa: E402
from .merge import merge_attention  # noqa: E402

__all__ = ["attention", "available_backends", "get_backend", "masks", "merge_attention"]


def __getattr__(name: str):
    # lightning attention is loaded on first use, so `import longreach.kernels` stays light
    if name == "lightning_attention":
        from .lightning import lightning_attention

        return lightning_attention
    raise AttributeError(f"module 'longreach.kernels' has no attribute {name!r}")
