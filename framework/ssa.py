"""SSA (stochastically subsampled attention) outside the kernels: training masks and self-ensembles.

Training draws a fresh SSA sample every step (the step and layer reach the mask through
:class:`~longreach.attention.AttentionContext`); evaluation is dense causal by default. The optional
self-ensemble evaluation (Information Pathways, KDD 2023) averages the *probabilities* of ``n``
subsampled passes, each with its own sample:

    probs = ensemble_forward(lambda i: model(tokens, ssa_step=i), n=4)   # [B, S, V]

The attention-config fields (``pattern``, ``ssa_*``) map to masks in
:func:`longreach.attention.pattern_masks`.
"""
from __future__ import annotations

from typing import Callable

import torch

from longreach.errors import ConfigError

__all__ = ["ENSEMBLE_FIRST_STEP", "ensemble_forward", "ensemble_nll"]

ENSEMBLE_FIRST_STEP = 1 << 30
"""Step index of the first evaluation sample: far from any training step, so the ensemble's masks are
fresh draws rather than masks some training step used."""


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


def ensemble_nll(hidden_fn: Callable[[int], torch.Tensor], weight: torch.Tensor, labels: torch.Tensor, n: int,
                 *, first_step: int = ENSEMBLE_FIRST_STEP, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss of the SSA self-ensemble: −log of the mean probability of ``n`` passes.

    Args:
        hidden_fn: ``hidden_fn(step) -> [B, S, dim]`` final hidden states of one pass with the SSA sample
            of ``step`` (training masks on, no gradients needed).
        weight: ``[V, dim]`` output projection.
        labels: ``[B, S]`` target ids (``ignore_index`` where no loss).
        n: number of passes (1: a single subsampled pass).
        first_step: step index of the first sample.

    Returns:
        ``(loss_sum, n_tokens)``: float64 sum of the ensemble's token losses and the count of scored tokens.
    """
    logp = ensemble_forward(lambda i: hidden_fn(i) @ weight.t(), n, first_step=first_step, log=True)  # [B, S, V]
    valid = labels != ignore_index  # [B, S]
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [B, S]
    return -(picked.double() * valid).sum(), valid.sum()
