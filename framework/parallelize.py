"""Apply parallelism to a model written for one device, in a fixed order (torchtitan's recipe).

1. **Attention seam first**: every module with an ``inner_attention`` gets the configured inner attention
   (local, or context-parallel through ``longreach.parallel.cp_attention``), and every module with a
   ``parallelize_context(cp_group, parallel_cfg)`` hook (linear-attention layers, custom layers) is
   called to swap its own seam. This must come before the wrappers below: they copy or hide the module
   tree, and a wrapper applied first would checkpoint / replicate the old callable.
2. **Activation checkpointing** wraps each decoder block, so recomputation in backward reruns the
   already-swapped (possibly context-parallel) attention.
3. **DDP last**, over the whole dp × cp group: parameters are replicated on every cp rank too, so their
   gradients are reduced across both. Gradients are *summed* (not averaged): the trainer divides each
   rank's summed token loss by the global count of non-ignored tokens, so the sum over ranks of the local
   gradients is exactly the gradient of the global mean loss, whatever the token counts per rank.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longreach.attention import ContextParallelAttention, LocalAttention, pattern_masks

log = logging.getLogger(__name__)

__all__ = ["dp_cp_group", "cp_group", "parallelize", "unwrap"]


def cp_group(mesh: Any) -> dist.ProcessGroup | None:
    """The context-parallel process group of ``mesh`` (None without a mesh or with cp = 1)."""
    if mesh is None:
        return None
    sub = mesh["cp"]  # a mesh dimension, or the flattened (cp_ring, cp_ulysses) of the hybrid strategy
    return None if sub.size() == 1 else sub.get_group()


def dp_cp_group(mesh: Any) -> dist.ProcessGroup | None:
    """The group that replicates parameters: all of dp × cp (None: single process)."""
    if mesh is None or not dist.is_initialized():
        return None
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten("dp_cp").get_group()


def _sum_allreduce_hook(group, bucket):  # no annotations: DDP checks them against the real classes
    """DDP comm hook: all-reduce SUM of the bucket (DDP's default divides by the group size)."""
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _inner_attention(job_cfg: Any, mesh: Any) -> LocalAttention:
    att, par = job_cfg.attention, job_cfg.parallel
    mask, train_mask = pattern_masks(att, job_cfg.train.seq_len)
    group = cp_group(mesh)
    if group is None:
        return LocalAttention(att.backend, train_mask=train_mask, mask=mask)
    backend = par.backend if par.backend != "auto" else att.backend
    return ContextParallelAttention(strategy=par.strategy, layout=par.layout, group=group,
                                    ulysses_degree=par.ulysses_degree, backend=backend,
                                    train_mask=train_mask, mask=mask)


def parallelize(model: nn.Module, job_cfg: Any, mesh: Any, *, data_parallel: bool = True) -> nn.Module:
    """Swap attention, apply activation checkpointing, wrap in DDP — in that order (module docstring).

    Args:
        model: a model built for one device (``longreach.models.build_model``), already on its device.
        job_cfg: the :class:`~longreach.job.JobConfig` (reads ``attention``, ``parallel``, ``train``).
        mesh: DeviceMesh with dims ("dp", "cp"), or None for a single process.
        data_parallel: apply step 3 (DDP); False when an engine (``longreach.engines``: FSDP2,
            DeepSpeed, accelerate) wraps the model afterwards.

    Returns:
        The model to train: the same module, or a ``DistributedDataParallel`` around it. Use
        :func:`unwrap` to reach the model's own attributes (``output_weight``, ``aux_loss``).
    """
    group = cp_group(mesh)
    # 1. the attention seam
    swapped = hooked = 0
    for module in model.modules():
        hook = getattr(module, "parallelize_context", None)
        if callable(hook):
            hook(group, job_cfg.parallel)
            hooked += 1
        elif hasattr(module, "inner_attention"):
            module.inner_attention = _inner_attention(job_cfg, mesh)
            swapped += 1
    log.info("parallelize: %d attention seams -> %s%s", swapped,
             "local" if group is None else f"cp={dist.get_world_size(group)} {job_cfg.parallel.strategy}/"
             f"{job_cfg.parallel.layout}", f", {hooked} modules through parallelize_context" if hooked else "")
    # 2. activation checkpointing, per decoder block
    if job_cfg.train.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                                 checkpoint_wrapper)

        layers = getattr(model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError("train.activation_checkpointing needs a model with a `layers` ModuleList")
        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    # 3. data parallel over dp × cp
    replicas = dp_cp_group(mesh)
    if not data_parallel or replicas is None or dist.get_world_size(replicas) == 1:
        return model
    dev = next(model.parameters()).device
    ddp = nn.parallel.DistributedDataParallel(
        model, process_group=replicas, device_ids=[dev.index] if dev.type == "cuda" else None)
    ddp.register_comm_hook(replicas, _sum_allreduce_hook)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
