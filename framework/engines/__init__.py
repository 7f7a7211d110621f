"""Training engines: how the model, its gradients and its optimizer are distributed.

The trainer talks to one :class:`Engine` whatever runs underneath — native torch (DDP or FSDP2),
DeepSpeed (ZeRO 1-3) or accelerate — chosen by the ``engine:`` config section (:class:`EngineConfig`).
Engines are the only place a model is wrapped for data parallelism. Context parallelism is independent of
the engine: it lives in the model's ``inner_attention`` seam (applied by ``longreach.model_setup``) and
every engine reduces gradients over the whole dp × cp group.

    engine = build_engine(cfg.engine, model, lambda params: torch.optim.AdamW(params, lr=...),
                          group=None, grad_accum=2)
    with engine.forward_context():
        loss = loss_fn(engine.model(x))
    engine.backward(loss)
    grad_norm = engine.clip_grad_norm(1.0)
    engine.step()
    ckpt.save(step, {**engine.checkpoint_state(), "scheduler": sched, ...})
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .accelerate import build_accelerate
from .base import ENGINES, PRECISIONS, Engine, EngineConfig, EngineOptions, OptimizerFactory, as_engine_config, unwrap
from .deepspeed import build_deepspeed
from .native import build_native

__all__ = ["ENGINES", "Engine", "EngineConfig", "EngineOptions", "OptimizerFactory", "PRECISIONS",
           "as_engine_config", "build_engine", "unwrap"]


def build_engine(cfg: EngineConfig, model: nn.Module, optimizer_factory: OptimizerFactory, *,
                 group: Any = None, mesh: Any = None, grad_accum: int = 1,
                 micro_batch_size: int = 1, grad_clip: float | None = None) -> Engine:
    """Wrap ``model`` for data parallelism and build its optimizer for the configured engine.

    Args:
        cfg: the ``engine:`` section.
        model: the model after ``longreach.model_setup.parallelize`` (seams swapped, experts split,
            activation checkpointing applied), not yet wrapped.
        optimizer_factory: ``params -> torch.optim.Optimizer``; called on the wrapped model's
            parameters (FSDP2 DTensors, DeepSpeed's partitions are handled by the engine).
        group: process group over which gradients are averaged (the whole dp × cp group; default WORLD).
        mesh: optional DeviceMesh with dims ("dp", "cp"); FSDP2 shards over its flattened dp × cp.
        grad_accum: micro-batches per optimizer step (DeepSpeed needs it in its config).
        micro_batch_size: per-rank micro-batch size (DeepSpeed config bookkeeping only).
        grad_clip: gradient clipping for DeepSpeed (which clips inside its step).
    Returns:
        The engine.
    """
    cfg = as_engine_config(cfg)
    if cfg.kind == "native":
        return build_native(cfg, model, optimizer_factory, group=group, mesh=mesh)
    if cfg.kind == "deepspeed":
        return build_deepspeed(cfg, model, optimizer_factory, group=group, grad_accum=grad_accum,
                               micro_batch_size=micro_batch_size, grad_clip=grad_clip)
    return build_accelerate(cfg, model, optimizer_factory, group=group)
