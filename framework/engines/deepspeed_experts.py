"""Split experts beside DeepSpeed: what :class:`~longreach.engines.deepspeed.DeepSpeedEngine` changes in
DeepSpeed's engine and optimizers so that experts split over cp (``longreach.mixtures.expert_parallel``) stay
out of DeepSpeed's data parallelism and still share its clip, its overflow check and its checkpoints.

* ZeRO-0 all-reduces every module gradient: :func:`experts_out_of_allreduce` holds the experts' back.
* ZeRO-1/2 and ZeRO-3 measure one global norm: :func:`with_expert_norm` / :func:`with_expert_norm_zero3` add
  the experts' to it (so one clip coefficient, and an fp16 overflow in an expert skips DeepSpeed's step too).
* ZeRO-3 partitions every parameter of its module: :func:`hide_experts` takes the experts out of the module
  tree it sees, and :class:`Zero3CheckpointView` names them again for DCP beside the gathered dense weights.
* bf16/fp16: :func:`masters_in_state_dict` makes DCP save the dense weights as DeepSpeed's fp32 masters.
* DeepSpeed's own checkpoint files get each rank's plain expert tensors (:class:`PlainExpertsEngine`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from longreach.errors import ConfigError
from longreach.mixtures.expert_parallel import as_expert_dtensor, expert_shards

from .base import EngineConfig

__all__ = ["PlainExpertsEngine", "Zero3CheckpointView", "check_user_config", "experts_out_of_allreduce",
           "hide_experts", "masters_in_state_dict", "unhide_experts", "with_expert_norm", "with_expert_norm_zero3"]


def masters_in_state_dict(eng: Any, shards: Any) -> None:
    """Under bf16/fp16 with split experts, the module's ``state_dict()`` for DCP (not DeepSpeed's own files:
    ``shards.dtensor_state`` off) gives the dense weights as DeepSpeed's fp32 masters, under every name of a
    tied weight (one tensor, so DCP still saves it once)."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if not shards.dtensor_state:
            return
        names: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(prefix + name)
        for p, master in eng.dense_masters():
            for key in names.get(id(p), ()):
                if key in state_dict:
                    state_dict[key] = master

    eng.module.register_state_dict_post_hook(hook)


class PlainExpertsEngine:
    """A DeepSpeed engine's save/load with the model's expert weights as plain local tensors."""

    def __init__(self, engine: Any, module: nn.Module) -> None:
        self.engine, self.module = engine, module

    def _plain(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        shards = expert_shards(self.module)
        shards.dtensor_state = False
        try:
            return fn(*args, **kwargs)
        finally:
            shards.dtensor_state = True

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        return self._plain(self.engine.save_checkpoint, *args, **kwargs)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        return self._plain(self.engine.load_checkpoint, *args, **kwargs)


def with_expert_norm(eng: Any, zero_optimizer: Any) -> None:
    """Make ZeRO's global gradient norm include the split experts' (recorded before each step)."""
    dense_norm = zero_optimizer.scaled_global_norm

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        dense = dense_norm(norm_type)  # norm × loss scale
        return torch.sqrt(dense.double() ** 2 + eng._expert_sq * float(zero_optimizer.loss_scale) ** 2).to(dense.dtype)

    zero_optimizer.scaled_global_norm = scaled_global_norm


def with_expert_norm_zero3(eng: Any, zero_optimizer: Any) -> None:
    """ZeRO-3's global gradient norm (combined from per-group norms × loss scale) with the split experts'
    norm as one more group."""
    groups = zero_optimizer._get_norm_groups

    def norm_groups() -> list[torch.Tensor]:
        dense = groups()
        expert = math.sqrt(eng._expert_sq) * float(zero_optimizer.loss_scale)
        return [*dense, torch.tensor(expert, dtype=dense[0].dtype, device=dense[0].device)]

    zero_optimizer._get_norm_groups = norm_groups


def hide_experts(model: nn.Module, shards: Any) -> None:
    """Take the split experts out of the module tree DeepSpeed ZeRO-3 sees (before ``deepspeed.initialize``).

    ZeRO-3 partitions every parameter of the module it is given over all ranks and walks them all in its
    hooks and steps; the experts, already split over cp and reduced over dp by the engine, must stay whole
    on their rank. Each stays an attribute of its module (``self.weight`` still resolves, so forward is
    unchanged) but leaves ``_parameters``: ``parameters()``, ``state_dict()`` and DeepSpeed skip it.
    :class:`Zero3CheckpointView` names them for checkpoints.
    """
    owners = {id(p) for p in shards.params}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in owners:
                del module._parameters[name]
                module.__dict__[name] = p


def unhide_experts(model: nn.Module, shards: Any) -> None:
    """Undo :func:`hide_experts`: each split expert is a registered parameter of its module again."""
    owners = {id(p) for p in shards.params}
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, nn.Parameter) and id(value) in owners:
                del module.__dict__[name]
                module._parameters[name] = value


class Zero3CheckpointView(nn.Module):
    """The whole model as DCP sees it under ZeRO-3 with split experts: dense weights gathered as DeepSpeed's
    fp32 masters, the experts (out of the module tree, :func:`hide_experts`) as ``Shard(0)`` DTensors over
    cp, under the model's own names — so a checkpoint reads back on one process (export, ``sources``) or
    under another engine like any other.

    ``named_parameters()`` yields the experts only (the expert optimizer's parameters, for DCP's optimizer
    state); attribute paths resolve in the model. Loading restores the experts; the dense part comes back
    from DeepSpeed's own files, loaded first.
    """

    def __init__(self, module: nn.Module, shards: Any) -> None:
        super().__init__()
        self.__dict__["_model"] = module  # not a child: named_parameters() is the experts only
        self.__dict__["_shards"] = shards
        self.__dict__["_names"] = [n.replace(_CHECKPOINT_PREFIX, "") for n in shards.names]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_model"], name)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in zip(self._names, self._shards.params):
            yield prefix + name, p

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Full fp32 dense weights (gathered: collective), buffers, and the experts as DTensors."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        model = self._model
        sd: dict[str, Any] = {}
        seen: dict[int, torch.Tensor] = {}
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, p in params.items():
            if id(p) not in seen:
                full = safe_get_full_fp32_param(p) if p.requires_grad else None
                if full is None:  # frozen: not in the optimizer, gather the module's copy
                    with deepspeed.zero.GatheredParameters([p]):
                        full = p.detach().clone()
                seen[id(p)] = full.float()
            sd[name.replace(_CHECKPOINT_PREFIX, "")] = seen[id(p)]  # tied names share one tensor
        for name, b in model.state_dict().items():
            if name not in params:
                sd[name.replace(_CHECKPOINT_PREFIX, "")] = b
        for name, p in zip(self._names, self._shards.params):
            sd[name] = as_expert_dtensor(p.detach(), self._shards.ep_mesh)
        return sd

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        with torch.no_grad():
            for name, p in zip(self._names, self._shards.params):
                v = state_dict[name]
                p.copy_(v.to_local() if hasattr(v, "to_local") else v)
        return nn.modules.module._IncompatibleKeys([], [])


def check_user_config(cfg: EngineConfig, conf: dict[str, Any]) -> None:
    """Split experts follow ``engine.options.zero_stage`` and ``train.precision``: an ``engine.deepspeed_config``
    file that changes either would leave them handled for another configuration than DeepSpeed runs."""
    stage = conf.get("zero_optimization", {}).get("stage", 0)
    if stage != cfg.zero_stage:
        raise ConfigError(f"engine.deepspeed_config sets zero_optimization.stage={stage} but "
                          f"engine.options.zero_stage={cfg.zero_stage}; with model.moe.expert_parallel set the stage "
                          "in engine.options.zero_stage only")
    for key, precision in (("bf16", "bf16"), ("fp16", "fp16")):
        if bool(conf.get(key, {}).get("enabled", False)) != (cfg.precision == precision):
            raise ConfigError(f"engine.deepspeed_config sets {key}.enabled against train.precision="
                              f"{cfg.precision}; with model.moe.expert_parallel set the precision in "
                              "train.precision only")


def experts_out_of_allreduce(ds_engine: Any, shards: Any) -> None:
    """ZeRO-0 all-reduces every module gradient at the boundary (``allreduce_gradients``): hold the expert
    gradients back from it (they are summed over their dp replicas only, ``finish_expert_gradients``)."""
    reduce = ds_engine.allreduce_gradients

    def allreduce_gradients(*args: Any, **kwargs: Any) -> Any:
        held = [p.grad for p in shards.params]
        for p in shards.params:
            p.grad = None
        try:
            return reduce(*args, **kwargs)
        finally:
            for p, g in zip(shards.params, held):
                p.grad = g

    ds_engine.allreduce_gradients = allreduce_gradients
