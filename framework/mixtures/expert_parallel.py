"""Expert parallelism of MoE layers inside a data × context parallel job: split, reduce, clip, save.

With ``model.moe.expert_parallel`` under cp > 1, :func:`apply_expert_parallel` (a step of
``longreach.model_setup.parallelize``, before any wrapper and before the optimizer exists) keeps only this
rank's ``E / cp`` experts over the **cp** group. The ranks that hold the *same* experts are the ranks
with the same cp coordinate, i.e. the **dp** dimension of the mesh. The engine (``longreach.engines``)
leaves the expert parameters out of its own data parallelism (DDP's ignore list, FSDP2's
``ignored_params``, or beside DeepSpeed) and, once per step, :func:`finish_expert_gradients` turns the
averaging engine's convention into exact expert gradients: divide by the replica count the trainer
scaled the loss by, then SUM over the dp replicas (every replica's tokens reach its own copy of the
expert through the all-to-all, so the sum is the exact gradient). :func:`clip_grad_norm` then adds each
expert's squared norm once (a sum over the cp group) to the replicated parameters' one.

For checkpoints, expert weights and their optimizer state appear in ``state_dict()`` as DTensors sharded
``Shard(0)`` over the cp mesh dimension (:func:`expert_optimizer_hooks` does it for the optimizer), so
torch.distributed.checkpoint writes each rank's experts under the one global key and can load them on
another layout (another cp size, or no expert parallelism at all).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from longreach.errors import ConfigError
from longreach.parallel.comm import all_reduce

from .moe import MoEFFN, expert_parameter_names, is_expert_parameter

log = logging.getLogger(__name__)

__all__ = ["ExpertShards", "apply_expert_parallel", "as_expert_dtensor", "clip_grad_norm", "expert_optimizer_hooks",
           "expert_shards", "finish_expert_gradients", "reduce_expert_gradients"]

_SHARDS_ATTR = "_longreach_expert_shards"


@dataclasses.dataclass(kw_only=True, slots=True)
class ExpertShards:
    """Expert parallelism applied by :func:`apply_expert_parallel` (kept on the unwrapped model)."""

    ep_mesh: Any
    """1-D DeviceMesh the experts are split over: the mesh's cp dimension (rank r holds experts r·E/P …)."""
    replicas: dist.ProcessGroup | None
    """Ranks holding the same experts: the mesh's dp dimension; None when dp = 1 (nothing to reduce)."""
    params: list[nn.Parameter]
    """This rank's expert parameters (``[E / P, …]`` each)."""
    names: list[str]
    """Their fully qualified names in the (activation-checkpointed) model, as DDP and checkpoints see them."""
    dtensor_state: bool = True
    """``state_dict()`` gives expert weights as ``Shard(0)`` DTensors (False: this rank's plain tensors, for
    a checkpoint format that is not DCP's — DeepSpeed's own files)."""


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def expert_shards(model: nn.Module) -> ExpertShards | None:
    """The expert sharding :func:`apply_expert_parallel` applied to ``model`` (DDP-wrapped or not), or None."""
    return getattr(_unwrapped(model), _SHARDS_ATTR, None)


def expert_parallel_layers(model: nn.Module) -> list[MoEFFN]:
    """MoE layers configured for expert parallelism (``model.moe.expert_parallel``)."""
    return [m for m in model.modules() if isinstance(m, MoEFFN) and m.cfg.expert_parallel]


def apply_expert_parallel(model: nn.Module, mesh: Any, group: dist.ProcessGroup) -> list[MoEFFN]:
    """Keep only this rank's experts (over the cp ``group``); record the groups and install checkpoint hooks.

    Args:
        model: the single-device model, before any wrapper.
        mesh: the job's DeviceMesh (its ``cp`` dimension splits the experts, ``dp`` holds the replicas).
        group: the cp process group of ``mesh``.

    Returns:
        The MoE layers split (empty: nothing configured for expert parallelism).
    """
    layers = expert_parallel_layers(model)
    if not layers:
        return []
    moe = [m for m in model.modules() if isinstance(m, MoEFFN)]
    if len(layers) != len(moe):
        raise ConfigError("model.moe.expert_parallel must be set for every MoE layer or for none")
    cp = dist.get_world_size(group)
    bad = sorted({m.cfg.num_experts for m in moe if m.cfg.num_experts % cp})
    if bad:
        raise ConfigError(f"model.moe.experts={bad[0]} does not divide by parallel.cp={cp}, which "
                        "model.moe.expert_parallel splits the experts over; use a multiple of parallel.cp")
    for m in moe:
        m.shard_experts(group)
    params = [p for p in model.parameters() if is_expert_parameter(p)]  # same order on every rank
    dp_dim = mesh["dp"]
    shards = ExpertShards(ep_mesh=mesh["cp"], replicas=dp_dim.get_group() if dp_dim.size() > 1 else None,
                          params=params, names=expert_parameter_names(model))
    setattr(model, _SHARDS_ATTR, shards)
    owners = {id(p) for p in params}
    for module in model.modules():
        if any(id(p) in owners for p in module.parameters(recurse=False)):
            module.register_state_dict_post_hook(_experts_to_dtensor(shards))
            module.register_load_state_dict_pre_hook(_experts_from_dtensor)
    n = sum(p.numel() for p in params)
    log.info("parallelize: %d MoE layers split their experts over cp=%d (%d expert parameters on this rank); "
             "expert gradients reduced over dp=%d", len(moe), cp, n, dp_dim.size())
    return layers


def rename_expert_parameters(model: nn.Module) -> None:
    """Record the expert parameter names after wrappers that rename them (activation checkpointing)."""
    shards = expert_shards(model)
    if shards is not None:
        shards.names = expert_parameter_names(model)


def as_expert_dtensor(local: torch.Tensor, ep_mesh: Any) -> torch.Tensor:
    """This rank's experts ``local [E / P, ...]`` as the DTensor ``[E, ...]`` sharded ``Shard(0)`` over ``ep_mesh``
    (sharing ``local``'s storage: a checkpoint load into it writes the parameter)."""
    shape = (local.shape[0] * ep_mesh.size(),) + tuple(local.shape[1:])  # [E, ...] global
    return DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _experts_to_dtensor(shards: ExpertShards):
    """Module ``state_dict`` post hook: this module's expert parameters as DTensors ``Shard(0)`` over cp."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if not shards.dtensor_state:
            return
        for name, p in module.named_parameters(recurse=False):
            key = prefix + name
            if is_expert_parameter(p) and key in state_dict and isinstance(state_dict[key], torch.Tensor):
                state_dict[key] = as_expert_dtensor(state_dict[key], shards.ep_mesh)

    return hook


def _experts_from_dtensor(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Module ``load_state_dict`` pre hook: the local shard of DTensor expert weights."""
    for name, p in module.named_parameters(recurse=False):
        v = state_dict.get(prefix + name)
        if is_expert_parameter(p) and hasattr(v, "to_local"):
            state_dict[prefix + name] = v.to_local()


def expert_optimizer_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.state_dict()`` hold expert states as DTensors over cp (and load them back).

    Call after building the optimizer of a model :func:`apply_expert_parallel` split experts in (no-op
    otherwise), so torch.distributed.checkpoint saves every rank's expert moments (module docstring).
    """
    shards = expert_shards(model)
    if shards is None:
        return
    owners = {id(p) for p in shards.params}

    def to_dtensor(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        for idx, st in sd["state"].items():
            p = params[idx] if isinstance(idx, int) else None
            if p is None or id(p) not in owners:
                continue
            # a new dict: Optimizer.state_dict() shares the live per-parameter state dicts
            sd["state"][idx] = {k: as_expert_dtensor(v, shards.ep_mesh)
                                if isinstance(v, torch.Tensor) and v.shape == p.shape else v  # moments, not step
                                for k, v in st.items()}

    def to_local(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        for key, st in sd.get("state", {}).items():
            sd["state"][key] = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in st.items()}

    optimizer.register_state_dict_post_hook(to_dtensor)
    optimizer.register_load_state_dict_pre_hook(to_local)


def reduce_expert_gradients(model: nn.Module) -> None:
    """SUM all-reduce expert gradients over the ranks holding the same experts (the dp dimension).

    Collective over that group. An expert shard that received no tokens on this rank gets a zero
    gradient, as its rows of a replicated expert weight would, so every rank joins and the optimizer
    steps it the same way (momentum, decay).
    """
    shards = expert_shards(model)
    if shards is None:
        return
    for p in shards.params:
        if p.grad is None and p.requires_grad:
            p.grad = torch.zeros_like(p)
    if shards.replicas is None:
        return
    grads = [p.grad for p in shards.params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # [n expert elements]
    all_reduce(flat, group=shards.replicas)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def finish_expert_gradients(model: nn.Module, loss_scale: int) -> ExpertShards | None:
    """Exact expert gradients after an averaging engine's backward: divide by ``loss_scale`` (the replica
    count the trainer multiplied the loss by; the engine's own reduction skipped the experts), then
    :func:`reduce_expert_gradients`. Collective over the dp replicas; call once per step, after the last
    backward. Returns the shards (None: no split experts, nothing done)."""
    shards = expert_shards(model)
    if shards is None:
        return None
    for p in shards.params:
        if p.grad is not None:
            p.grad.div_(loss_scale)
    reduce_expert_gradients(model)
    return shards


def expert_norm_sq(shards: ExpertShards) -> torch.Tensor:
    """``[1]`` float64: the squared norm of all experts' gradients (each expert lives on one cp rank, so
    this rank's part summed over the cp group). Collective over cp."""
    sq = torch.zeros(1, dtype=torch.float64, device=shards.params[0].device)
    for p in shards.params:
        sq += p.grad.detach().double().pow(2).sum()
    all_reduce(sq, group=shards.ep_mesh.get_group())
    return sq


def clip_grad_norm(model: nn.Module, params: list[nn.Parameter], max_norm: float) -> float:
    """Clip gradients by the global norm, counting each split expert once; returns the norm before clipping.

    Without split experts this is ``torch.nn.utils.clip_grad_norm_`` (all gradients are replicated).
    With them, the squared norm of this rank's expert gradients is summed over the cp group (each expert
    lives on one cp rank; dp replicas hold equal reduced copies) and added to the replicated part.
    """
    shards = expert_shards(model)
    if shards is None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)) if params else 0.0
    owners = {id(p) for p in shards.params}
    dense_sq = torch.zeros((), dtype=torch.float64, device=shards.params[0].device)
    for p in params:
        if id(p) not in owners:
            dense_sq += p.grad.detach().double().pow(2).sum()
    total = float((dense_sq + expert_norm_sq(shards)[0]).sqrt())  # every rank joins the cp reduction
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.detach().mul_(coef)
    return total
