"""Native torch engine: DDP (replicated) or FSDP2 ``fully_shard`` (sharded) over the dp × cp ranks.

Both average gradients over the group (the trainer scales the loss by its size, see
``longreach.engines.base``). Split experts (``longreach.mixtures.expert_parallel``) stay out of both:
DDP ignores their parameters, FSDP2 leaves them unsharded, and the engine completes their gradients
(:func:`~longreach.mixtures.expert_parallel.finish_expert_gradients`) in :meth:`Engine.sync_gradients`.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from longreach.errors import ConfigError
from longreach.mixtures.expert_parallel import (clip_grad_norm, expert_norm_sq, expert_optimizer_hooks, expert_shards,
                                                finish_expert_gradients)
from longreach.parallel.comm import all_reduce

from .base import Engine, EngineConfig, OptimizerFactory

__all__ = ["DDPEngine", "FSDPEngine", "build_native"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class DDPEngine(Engine):
    """DDP over the dp × cp group (one process: the model as it is)."""

    kind = "ddp"

    def no_sync(self) -> Any:
        return self.model.no_sync() if hasattr(self.model, "no_sync") else super().no_sync()

    def sync_gradients(self) -> None:
        finish_expert_gradients(self.module, self.replicas)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Clip by the global norm, each split expert counted once."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        return clip_grad_norm(self.module, params, max_norm if max_norm else float("inf"))


class FSDPEngine(Engine):
    kind = "fsdp"

    def sync_gradients(self) -> None:
        finish_expert_gradients(self.module, self.replicas)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Clip by the global norm; split experts (left out of FSDP2) counted once, FSDP2 shards summed
        over all ranks."""
        shards = expert_shards(self.module)
        if shards is None:
            return super().clip_grad_norm(max_norm)
        owners = {id(p) for p in shards.params}
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        sharded_sq = torch.zeros(1, dtype=torch.float64, device=shards.params[0].device)
        for p in self.model.parameters():
            if p.grad is None or id(p) in owners:
                continue
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # this rank's FSDP2 shard
            sharded_sq += g.detach().double().pow(2).sum()
        all_reduce(sharded_sq, group=self.group)  # FSDP2 shards are disjoint over dp × cp
        total = float((sharded_sq + expert_norm_sq(shards)).sqrt())
        coef = (max_norm / (total + 1e-6)) if max_norm else 1.0
        if coef < 1.0:
            for g in grads:
                g.detach().mul_(coef)
        return total

    def autocast(self) -> Any:
        # FSDP2's MixedPrecisionPolicy already computes in bf16 (and casts the inputs); autocast on
        # top would only add casts.
        return nullcontext()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


def _fsdp_mesh(mesh: Any, group: Any) -> Any:
    """The 1-D mesh FSDP2 shards over: the flattened dp × cp dims of ``mesh``, or all ranks of ``group``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if mesh is not None:
        names = mesh.mesh_dim_names or ()
        if len(names) == 1:
            return mesh
        return mesh[tuple(names)]._flatten("dp_cp") if "dp_cp" not in names else mesh["dp_cp"]
    if group is None:
        return init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("dp_cp",))
    return DeviceMesh.from_group(group, device, mesh_dim_names=("dp_cp",))


def build_native(cfg: EngineConfig, model: nn.Module, optimizer_factory: OptimizerFactory, *,
                 group: Any = None, mesh: Any = None) -> Engine:
    """DDP or FSDP2 over the whole dp × cp group (single process: the model as is)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.fsdp and cfg.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("engine.options.cpu_offload (FSDP2 CPUOffloadPolicy) needs a GPU; turn it off on CPU")
    shards = expert_shards(model)
    if not _distributed() or (not cfg.fsdp and dist.get_world_size(group) == 1):
        optimizer = optimizer_factory(model.parameters())
        expert_optimizer_hooks(model, optimizer)
        return DDPEngine(cfg, model, model, optimizer, group)
    if not cfg.fsdp:
        if shards is not None:  # split experts: not replicated over dp × cp (the engine reduces them)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, shards.names)
        ddp = DistributedDataParallel(model, process_group=group,
                                      device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = optimizer_factory(ddp.parameters())
        expert_optimizer_hooks(model, optimizer)  # expert moments saved as Shard(0) DTensors over cp
        return DDPEngine(cfg, ddp, model, optimizer, group)

    kwargs: dict[str, Any] = {"mesh": _fsdp_mesh(mesh, group), "reshard_after_forward": cfg.reshard_after_forward}
    if cfg.precision == "bf16":
        # parameters are gathered in bf16 for compute; gradients are reduced in fp32 for accuracy
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    if shards is not None:  # experts split over the expert mesh dim: FSDP2 leaves them alone
        kwargs["ignored_params"] = set(shards.params)
    # Shard each transformer block on its own (so only one block's parameters are gathered at a
    # time), then the root for what is left (embeddings, final norm, head).
    blocks = getattr(model, "layers", None)
    if isinstance(blocks, (nn.ModuleList, nn.ModuleDict)):
        for block in (blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks):
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    optimizer = optimizer_factory(model.parameters())
    expert_optimizer_hooks(model, optimizer)  # expert moments saved as Shard(0) DTensors over cp
    return FSDPEngine(cfg, model, model, optimizer, group)
