"""accelerate engine: ``Accelerator.prepare`` (DDP underneath) with its own mixed precision."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longreach.errors import ConfigError

from .base import Engine, EngineConfig, OptimizerFactory


class AccelerateEngine(Engine):
    kind = "accelerate"

    def __init__(self, *args: Any, accelerator: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accelerator = accelerator

    def autocast(self) -> Any:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self) -> Any:
        return self.accelerator.no_sync(self.model)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm if max_norm else float("inf"))
        return float(norm) if norm is not None else 0.0

    def step(self) -> None:
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
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.mixed_precision]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp,
                              device_placement=torch.cuda.is_available())
    optimizer = optimizer_factory(model.parameters())
    prepared_model, prepared_opt = accelerator.prepare(model, optimizer)
    eng = AccelerateEngine(cfg, prepared_model, accelerator.unwrap_model(prepared_model), optimizer, group,
                           accelerator=accelerator)
    eng.prepared_optimizer = prepared_opt
    return eng
