"""accelerate engine: ``Accelerator.prepare`` (DDP underneath) with its own mixed precision.

Split experts (``longreach.mixtures.expert_parallel``) are kept out of accelerate's DDP as the native
engine keeps them out of its own: their names go on DDP's ignore list before ``prepare`` builds the DDP
wrapper, and the engine completes their gradients over the dp replicas in :meth:`Engine.sync_gradients`.
accelerate's bf16 autocasts around fp32 parameters, so the experts' fp32 weights are their own masters; under
fp16 the expert-aware global norm decides a skipped step for every rank alike (:meth:`AccelerateEngine.step`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from longreach.errors import ConfigError
from longreach.mixtures.expert_parallel import (clip_grad_norm, expert_optimizer_hooks, expert_shards,
                                                finish_expert_gradients)

from .base import Engine, EngineConfig, OptimizerFactory


class AccelerateEngine(Engine):
    kind = "accelerate"
    _overflow = False  # split experts: this step's global gradient norm was not finite (fp16)

    def __init__(self, *args: Any, accelerator: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accelerator = accelerator

    def autocast(self) -> Any:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self) -> Any:
        return self.accelerator.no_sync(self.model)

    def sync_gradients(self) -> None:
        # fp16: the expert gradients are still multiplied by the GradScaler's scale; dividing and summing
        # them commutes with the unscale that clip_grad_norm applies to every gradient
        finish_expert_gradients(self.module, self.replicas)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        if expert_shards(self.module) is None:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm if max_norm else float("inf"))
            return float(norm) if norm is not None else 0.0
        self.accelerator.unscale_gradients()  # fp16: the GradScaler's unscale (a no-op otherwise)
        params = [p for p in self.model.parameters() if p.grad is not None]
        total = clip_grad_norm(self.module, params, max_norm if max_norm else float("inf"))
        # the same on every rank: dense gradients are replicated, the experts' norm is summed over cp
        self._overflow = not math.isfinite(total)
        return total

    def step(self) -> None:
        scaler = self.accelerator.scaler
        if scaler is not None and self._overflow:
            # fp16 overflow in split experts: each rank's GradScaler saw only its own experts, so one may skip
            # the step and another not; skip on every rank and back the scale off alike
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            self.prepared_optimizer.zero_grad(set_to_none=True)
            return
        # the prepared optimizer applies accelerate's GradScaler under fp16
        self.prepared_optimizer.step()
        self.prepared_optimizer.zero_grad(set_to_none=True)

    def checkpoint_state(self) -> dict[str, Any]:
        # The prepared optimizer wraps the torch one; DCP needs the torch optimizer itself.
        return {"model": self.model, "optimizer": self.optimizer}


def build_accelerate(cfg: EngineConfig, model: nn.Module, optimizer_factory: OptimizerFactory, *,
                     group: Any = None) -> Engine:
    from accelerate import Accelerator

    if group is not None and dist.is_initialized() and dist.get_world_size(group) != dist.get_world_size():
        raise ConfigError("engine.kind=accelerate reduces gradients over all ranks; a sub-group is not supported")
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp,
                              device_placement=torch.cuda.is_available())
    shards = expert_shards(model)
    if shards is not None:  # split experts: not replicated over dp × cp (the engine reduces them)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, shards.names)
    optimizer = optimizer_factory(model.parameters())
    expert_optimizer_hooks(model, optimizer)  # expert moments saved as Shard(0) DTensors over cp
    prepared_model, prepared_opt = accelerator.prepare(model, optimizer)
    eng = AccelerateEngine(cfg, prepared_model, accelerator.unwrap_model(prepared_model), optimizer, group,
                           accelerator=accelerator)
    eng.prepared_optimizer = prepared_opt
    return eng
