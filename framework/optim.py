"""AdamW with decoupled weight decay on matrices only, and a warm-up + cosine/linear/constant schedule."""
from __future__ import annotations

import logging
import math

import torch
from typing import Iterable

from torch import nn
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module | Iterable[nn.Parameter], *, lr: float, weight_decay: float, betas: tuple[float, float]
                    ) -> torch.optim.AdamW:
    """AdamW; parameters with fewer than 2 dimensions (norm weights, biases) get no weight decay.

    Args:
        model: the (possibly wrapped) model, or its parameters (an engine's optimizer factory); tied
            parameters appear once.
        lr: peak learning rate (the scheduler multiplies it).
        weight_decay: decoupled weight decay of the matrices (embeddings included).
        betas: AdamW betas.
    """
    decay, no_decay = [], []
    for p in (model.parameters() if isinstance(model, nn.Module) else model):
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    low = [p for p in decay + no_decay if p.dtype in (torch.bfloat16, torch.float16)]
    if low:
        # no fp32 master weights: AdamW updates below half a bf16 step of a weight round away
        log.warning("optimizer: %d of %d trainable parameters are %s (no fp32 master weights): updates smaller "
                    "than ~1/256 of a weight are lost", len(low), len(decay) + len(no_decay), low[0].dtype)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: identical arithmetic on every device count, so resumed runs match bit for bit
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=False)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, lr: float, min_lr: float) -> float:
    """Multiplier of the peak ``lr`` for optimizer step ``step`` (0-based).

    Warm-up: linear from lr/(warmup+1) up to lr over ``warmup_steps`` steps; then ``constant`` keeps lr,
    ``cosine`` and ``linear`` decay to ``min_lr`` at ``total_steps`` (and stay there).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    floor = min_lr / lr
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return floor + (1 - floor) * (1 - t)
    raise ValueError(f"train.schedule must be cosine, constant or linear; got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, schedule: str,
                    lr: float, min_lr: float) -> LambdaLR:
    """A LambdaLR stepping :func:`lr_factor` once per optimizer step (its state_dict checkpoints)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps,
                                                      schedule=schedule, lr=lr, min_lr=min_lr))
