"""Native torch engine: DDP (replicated) or FSDP2 ``fully_shard`` (sharded) over the dp × cp ranks."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longreach.engines import Engine, EngineConfig, OptimizerFactory
from longreach.errors import ConfigError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class DDPEngine(Engine):
    kind = "ddp"

    def no_sync(self) -> Any:
        return self.model.no_sync() if hasattr(self.model, "no_sync") else super().no_sync()


class FSDPEngine(Engine):
    kind = "fsdp"

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Clip by the global norm; with split experts (left out of FSDP2), first SUM their gradients over
        the dp replicas, then count each expert once (FSDP2 shards: summed over all ranks)."""
        from longreach.parallelize import expert_shards, reduce_expert_gradients

        shards = expert_shards(self.module)
        if shards is None:
            return super().clip_grad_norm(max_norm)
        # Engines average gradients over dp × cp, so the trainer scales the loss by that count; FSDP2 does
        # not reduce the split experts, whose gradients are SUMs over their dp replicas: undo the scale.
        n = dist.get_world_size(self.group)
        for p in shards.params:
            if p.grad is not None:
                p.grad.div_(n)
        reduce_expert_gradients(self.module)  # complete expert gradients after this
        owners = {id(p) for p in shards.params}
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        device = shards.params[0].device
        sq = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(2)]  # [sharded], [expert]
        for p in self.model.parameters():
            if p.grad is None:
                continue
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # this rank's FSDP2 shard
            sq[int(id(p) in owners)] += g.detach().double().pow(2).sum()
        dist.all_reduce(sq[0], group=self.group)  # FSDP2 shards are disjoint over dp × cp
        dist.all_reduce(sq[1], group=shards.ep_mesh.get_group())  # each expert lives on one cp rank
        total = float((sq[0] + sq[1]).sqrt())
        coef = (max_norm / (total + 1e-6)) if max_norm else 1.0
        if coef < 1.0:
            for g in grads:
                g.detach().mul_(coef)
        return total

    def autocast(self) -> Any:
        # FSDP2's MixedPrecisionPolicy already computes in bf16 (and casts the inputs); autocast on
        # top would only add casts.
        from contextlib import nullcontext

        return nullcontext()

    def no_sync(self) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def _ctx():
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

        return _ctx()


def _fsdp_mesh(mesh: Any, group: Any) -> Any:
    """The 1-D mesh FSDP2 shards over: the flattened dp × cp dims of ``mesh``, or all ranks of ``group``."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

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
    if not _distributed():
        if cfg.fsdp and cfg.cpu_offload and not torch.cuda.is_available():
            raise ConfigError("engine.cpu_offload (FSDP2 CPUOffloadPolicy) needs a GPU")
        return DDPEngine(cfg, model, model, optimizer_factory(model.parameters()), group)
    if not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, process_group=group, device_ids=[device.index] if device.type == "cuda" else None,
                  broadcast_buffers=False)
        return DDPEngine(cfg, ddp, model, optimizer_factory(ddp.parameters()), group)

    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if cfg.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("engine.cpu_offload (FSDP2 CPUOffloadPolicy) needs a GPU; turn it off on CPU")
    shard_mesh = _fsdp_mesh(mesh, group)
    kwargs: dict[str, Any] = {"mesh": shard_mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if cfg.mixed_precision == "bf16":
        # parameters are gathered in bf16 for compute; gradients are reduced in fp32 for accuracy
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    from longreach.parallelize import expert_shards

    shards = expert_shards(model)
    if shards is not None:  # experts split by parallelize (expert mesh dim): FSDP2 leaves them alone
        kwargs["ignored_params"] = set(shards.params)
    # Shard each transformer block on its own (so only one block's parameters are gathered at a
    # time), then the root for what is left (embeddings, final norm, head).
    blocks = getattr(model, "layers", None)
    if isinstance(blocks, (nn.ModuleList, nn.ModuleDict)):
        for block in (blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks):
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    optimizer = optimizer_factory(model.parameters())
    if shards is not None:
        from longreach.parallelize import expert_optimizer_hooks

        expert_optimizer_hooks(model, optimizer)  # expert moments saved as Shard(0) DTensors over cp
    return FSDPEngine(cfg, model, model, optimizer, group)
