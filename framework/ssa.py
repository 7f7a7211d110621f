"""SSA (stochastically subsampled attention) outside the kernels: training masks and self-ensembles.

Training draws a fresh SSA sample every step (the step and layer reach the mask through
:class:`~longreach.attention.AttentionContext`); evaluation is dense causal by default. The optional
self-ensemble evaluation (Information Pathways, KDD 2023) averages the *probabilities* of ``n``
subsampled passes, each with its own sample:

    probs = ensemble_forward(lambda i: model(tokens, ssa_step=i), n=4)   # [B, S, V]

:func:`pattern_mask` maps the attention-config fields (``pattern``, ``group_size``, ``sinks``,
``window``, ``block``, ``ssa_*``) to a training mask, so the config owner does not repeat the table.
"""
from __future__ import annotations

from typing import Callable

import torch

from longreach.errors import ConfigError
from longreach.kernels import masks as M

__all__ = ["ensemble_forward", "pattern_mask", "PATTERNS"]

PATTERNS = ("dense", "s2", "s2_roll", "sf", "sliding_window", "sinks_window", "power", "ssa")


def ensemble_forward(
    model_fn: Callable[[int], torch.Tensor], n: int, *, first_step: int = 0, log: bool = False
) -> torch.Tensor:
    """Average the softmax probabilities of ``n`` subsampled passes (SSA self-ensemble).

    Args:
        model_fn: called as ``model_fn(step)`` for ``step = first_step … first_step+n−1``; it must run the
            model with SSA masks bound to that step (so each pass sees a different sample) and return
            logits ``[..., V]``.
        n: number of passes (≥ 1).
        first_step: step index of the first sample (use a range disjoint from training steps if wanted).
        log: return log-probabilities instead of probabilities.

    Returns:
        ``[..., V]`` float32 mean probabilities (or their log), without gradients.
    """
    if int(n) < 1:
        raise ConfigError(f"eval_ensemble: the number of SSA passes must be >= 1, got {n}")
    total: torch.Tensor | None = None
    with torch.no_grad():
        for i in range(int(n)):
            p = torch.softmax(model_fn(first_step + i).float(), dim=-1)  # [..., V]
            total = p if total is None else total + p
    assert total is not None
    mean = total / int(n)
    return mean.log() if log else mean


def pattern_mask(
    pattern: str,
    *,
    group_size: int | None = None,
    sinks: int = 4,
    window: int | None = None,
    block: int = 128,
    ssa_ratio: float = 0.25,
    ssa_window: int = 2,
    ssa_block: int = 128,
    ssa_seed: int = 0,
    ssa_bias: str = "local",
) -> M.Mask | None:
    """The training-time mask for an attention ``pattern`` (None for ``dense``).

    Args:
        pattern: one of :data:`PATTERNS`. ``s2`` is LongLoRA's varlen path, ``s2_roll`` its roll path
            (not causal: use it with ``causal=False``).
        group_size: S2/SF group (tokens); LongLoRA uses a quarter of the training length.
        sinks: SF / sinks_window sink tokens.
        window: sliding window (tokens) for ``sliding_window`` / ``sinks_window``.
        block: PowerAttention block (tokens).
        ssa_ratio, ssa_window, ssa_block, ssa_seed, ssa_bias: :func:`longreach.kernels.masks.ssa` arguments
            (``ssa_window`` in blocks).
    """
    if pattern not in PATTERNS:
        raise ConfigError(f"attention.pattern: unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    if pattern in ("s2", "s2_roll", "sf") and group_size is None:
        raise ConfigError(f"attention.group_size is required for pattern {pattern!r}")
    if pattern in ("sliding_window", "sinks_window") and window is None:
        raise ConfigError(f"attention.window is required for pattern {pattern!r}")
    try:
        if pattern == "dense":
            return None
        if pattern == "s2":
            return M.s2(int(group_size), "varlen")
        if pattern == "s2_roll":
            return M.s2(int(group_size), "roll")
        if pattern == "sf":
            return M.sf(int(group_size), int(sinks))
        if pattern == "sliding_window":
            return M.sliding_window(int(window))
        if pattern == "sinks_window":
            return M.sinks(int(sinks)) | M.sliding_window(int(window))
        if pattern == "power":
            return M.power(int(block))
        return M.ssa(float(ssa_ratio), window=int(ssa_window), block=int(ssa_block), seed=int(ssa_seed),
                     bias=ssa_bias)
    except ValueError as e:  # the factories validate their own arguments
        raise ConfigError(f"attention.{pattern}: {e}") from e
