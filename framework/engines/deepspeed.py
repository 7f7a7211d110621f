"""DeepSpeed engine: ZeRO 1/2/3 from a generated DeepSpeed config, and DeepSpeed-Ulysses attention.

On CPU DeepSpeed runs over gloo (``deepspeed.init_distributed(dist_backend="gloo")``). We always
hand DeepSpeed a *torch* optimizer: its fused CPU/GPU optimizers are C++ extensions that compile for
about a minute on first use. For the same reason its shared-memory CPU all-reduce op is switched off
before DeepSpeed's communication layer starts (gloo does the reductions; the op only speeds up
``ccl`` on Xeon hosts).
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from longreach.errors import ConfigError
from longreach.mixtures.expert_parallel import (as_expert_dtensor, expert_norm_sq, expert_optimizer_hooks,
                                                expert_shards, finish_expert_gradients)

from .base import Engine, EngineConfig, OptimizerFactory


def deepspeed_config(cfg: EngineConfig, *, world_size: int, grad_accum: int = 1, micro_batch_size: int = 1,
                     grad_clip: float | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg`` (``engine.deepspeed_config`` keys override ours).

    Args:
        cfg: the ``engine:`` section.
        world_size: data-parallel world size DeepSpeed sees (all ranks: dp × cp).
        grad_accum: micro-batches per optimizer step.
        micro_batch_size: per-rank micro-batch size.
        grad_clip: global gradient-norm clip (None/0: off).
    Returns:
        The config dict passed to ``deepspeed.initialize``.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "zero_optimization": zero,
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.mixed_precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif cfg.mixed_precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"engine.deepspeed_config: file {path} does not exist") from None
        except ValueError as e:
            raise ConfigError(f"engine.deepspeed_config: {path} is not valid JSON ({e})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"engine.deepspeed_config: {path} must hold a JSON object")
        _merge(conf, user)
    return conf


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _import_deepspeed() -> Any:
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        # see the module docstring: no JIT build of the shm all-reduce op on CPU hosts
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def init_deepspeed_distributed() -> None:
    """Let DeepSpeed's comm layer adopt the already-initialised torch.distributed group."""
    ds = _import_deepspeed()
    ds.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine; with split experts (``EngineConfig.splits_experts``: ZeRO 0-3, any precision, but
    not ZeRO-0 with fp16) it owns them beside DeepSpeed.

    DeepSpeed is given the dense parameters only (ZeRO shards their optimizer state and gradients). The
    expert parameters, split over cp by ``longreach.model_setup``, stay fp32 whatever ``train.precision``
    says: DeepSpeed's bf16/fp16 casts the module, the engine puts the experts' fp32 tensors back, and the
    experts compute in the activations' dtype (``SwiGLUExperts`` casts its weights), so the fp32 weights are
    the masters and no bf16 rounding drops an update. They have their own torch optimizer here: at each
    accumulation boundary their gradients are completed over the dp replicas (``finish_expert_gradients``)
    and divided by DeepSpeed's loss scale (fp16), their squared norm joins DeepSpeed's global norm (one
    clip coefficient for everything; under ZeRO-0 the engine measures and clips both parts itself), and
    they are stepped with the LR DeepSpeed's optimizer uses, or not at all when DeepSpeed skips the step
    (fp16 overflow, which expert gradients trigger too). Checkpoints: DeepSpeed's own files hold the dense
    part; the expert weights and moments go through DCP as ``Shard(0)`` DTensors over cp, beside the dense
    weights as DeepSpeed's fp32 masters (:meth:`checkpoint_state`).
    """

    kind = "deepspeed"
    expert_optimizer: torch.optim.Optimizer | None = None
    _expert_sq: float = 0.0
    _grad_norm: float | None = None

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer normalises the loss by the global token count itself: no 1/grad_accum scaling.
        self.model.backward(loss, scale_wrt_gas=False)
        self._grad_norm = None
        boundary = self.model.is_gradient_accumulation_boundary()
        held = self._take_expert_gradients() if boundary and self.expert_optimizer is not None else None
        if self.cfg.zero_stage == 0 and boundary:
            # ZeRO-0 records no global norm DeepSpeed's way: measure the (reduced) dense gradients here,
            # and with split experts clip both parts by the one global norm (DeepSpeed's clipping is off)
            scale = _loss_scale(self.ds_optimizer)
            dense = [p.grad for p in self.module.parameters() if p.grad is not None]
            sq = sum((g.detach().double().pow(2).sum() for g in dense), torch.zeros((), dtype=torch.float64))
            total = float(sq.sqrt()) / scale
            if held is not None:
                total = (total ** 2 + self._expert_sq) ** 0.5
                coef = _clip_coef(total, self.grad_clip)
                if coef < 1.0:
                    for g in dense:
                        g.mul_(coef)
            self._grad_norm = total
        # DeepSpeed counts micro-steps in step(); it only updates at the accumulation boundary.
        self.model.step()
        if held is not None:
            self._step_experts(held)

    def _take_expert_gradients(self) -> list[torch.Tensor]:
        """Complete the expert gradients (undo the trainer's replica scale and DeepSpeed's loss scale, sum
        over dp replicas), record their squared norm over the cp group, and keep them away from DeepSpeed's
        step."""
        # the trainer scales the loss by the dp × cp replica count: all ranks under DeepSpeed
        shards = finish_expert_gradients(self.module, dist.get_world_size())
        scale = _loss_scale(self.ds_optimizer)
        grads = [p.grad.div_(scale) if scale != 1.0 else p.grad for p in shards.params]
        self._expert_sq = float(expert_norm_sq(shards))  # the same on every rank: reduced over dp and cp
        for p in shards.params:
            p.grad = None
        return grads

    def _step_experts(self, grads: list[torch.Tensor]) -> None:
        if getattr(self.ds_optimizer, "overflow", False) or not math.isfinite(self._expert_sq):
            return  # DeepSpeed skipped the step (fp16 overflow; expert gradients count, see build)
        if self.cfg.zero_stage == 0:
            coef = _clip_coef(self._grad_norm, self.grad_clip)
        else:
            total = self.model.get_global_grad_norm()  # DeepSpeed's norm, experts included (see build)
            coef = _clip_coef(float(total), self.grad_clip) if total is not None else 1.0
        for p, g in zip(expert_shards(self.module).params, grads):
            p.grad = g.mul_(coef) if coef < 1.0 else g
        lr = self.optimizer.param_groups[0]["lr"]  # the schedule drives DeepSpeed's optimizer
        for group in self.expert_optimizer.param_groups:
            group["lr"] = lr
        self.expert_optimizer.step()
        self.expert_optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        # DeepSpeed clips inside its step (config "gradient_clipping"); report what it measured, or under
        # ZeRO-0 what the engine measured before clipping (DeepSpeed's ZeRO-0 optimizers measure after it)
        norm = self._grad_norm if self._grad_norm is not None else self.model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def step(self) -> None:
        pass  # done in backward() at the accumulation boundary

    def skip_step(self) -> None:
        self.model.zero_grad()
        if self.expert_optimizer is not None:  # accumulated expert gradients (ZeRO-3: not among the module's)
            self.expert_optimizer.zero_grad(set_to_none=True)

    def no_sync(self) -> Any:
        return nullcontext()  # DeepSpeed defers reduction to the boundary on its own

    def checkpoint_state(self) -> dict[str, Any]:
        if self.expert_optimizer is None:
            return {"engine": self.model}
        # DeepSpeed's files get the model with this rank's plain expert tensors (rank 0's copy is what
        # DeepSpeed keeps, and DCP's expert state loads after it); DCP gets every rank's experts, and the
        # dense weights as DeepSpeed's fp32 masters (what an export of a bf16/fp16 run must read)
        model = _Zero3CheckpointView(self.module, expert_shards(self.module)) if self.cfg.zero_stage == 3 else self.module
        return {"engine": _PlainExpertsEngine(self.model, self.module), "model": model,
                "expert_optimizer": self.expert_optimizer}

    def dense_masters(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(module parameter, its fp32 master)`` for DeepSpeed's trainable parameters under bf16/fp16 (ZeRO
        0-2; the masters are DeepSpeed's, full size); empty in fp32, where the module holds the masters.
        Collective under ZeRO 1/2 (the partitions are gathered)."""
        if self.cfg.mixed_precision == "fp32" or self.cfg.zero_stage == 3:
            return []
        opt = self.model.optimizer
        if hasattr(opt, "fp16_groups"):  # ZeRO-0: DeepSpeed's fp16 wrappers (fused: flat masters; unfused: lists)
            from torch._utils import _unflatten_dense_tensors

            flat = getattr(opt, "fp32_groups_flat", None)
            masters = ([_unflatten_dense_tensors(f, ps) for f, ps in zip(flat, opt.fp16_groups)] if flat is not None
                       else opt.fp32_groups)
            return [(p, m) for params, group in zip(opt.fp16_groups, masters) for p, m in zip(params, group)]
        from deepspeed.utils import safe_get_full_fp32_param  # ZeRO 1/2: linked high-precision partitions

        pairs = []
        for p in self.module.parameters():
            master = safe_get_full_fp32_param(p) if p.requires_grad else None
            if master is not None:
                pairs.append((p, master.detach().to(p.device)))
        return pairs

    def close(self) -> None:
        """Hand the module back with the fp32 master weights in its trainable parameters.

        DeepSpeed's bf16 modes keep bf16 copies in the module and the fp32 masters in the optimizer: an
        update at lr 2e-5 moves the master of a norm weight of 1.0 but not its bf16 copy, so whatever
        reads the module after training (probe, export) would silently drop it. ZeRO-3 parameters stay
        partitioned (the export gathers them); split experts hidden from ZeRO-3 are parameters of their
        modules again.
        """
        shards = expert_shards(self.module)
        if shards is not None and self.cfg.zero_stage == 3:
            _unhide_experts(self.module, shards)  # DeepSpeed is done with the module: experts back in the tree
        if not self.model.bfloat16_enabled():
            return
        for p, master in self.dense_masters():
            p.data = master.detach().clone()


def _masters_in_state_dict(eng: DeepSpeedEngine, shards: Any) -> None:
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


def _loss_scale(optimizer: Any) -> float:
    """DeepSpeed's current loss scale (fp16; 1 otherwise)."""
    scale = getattr(optimizer, "loss_scale", None)
    if scale is None:
        scale = getattr(optimizer, "cur_scale", 1.0)
    return float(scale)


def _clip_coef(total: float | None, max_norm: float | None) -> float:
    """DeepSpeed's clip rule: gradients are multiplied by ``max_norm / (total + 1e-6)`` when that is < 1."""
    if not max_norm or total is None:
        return 1.0
    return 1.0 / max(1.0, (total + 1e-6) / max_norm)


class _PlainExpertsEngine:
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


def _with_expert_norm(eng: DeepSpeedEngine, zero_optimizer: Any) -> None:
    """Make ZeRO's global gradient norm include the split experts' (recorded before each step)."""
    dense_norm = zero_optimizer.scaled_global_norm

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        dense = dense_norm(norm_type)  # norm × loss scale
        return torch.sqrt(dense.double() ** 2 + eng._expert_sq * float(zero_optimizer.loss_scale) ** 2).to(dense.dtype)

    zero_optimizer.scaled_global_norm = scaled_global_norm


def _with_expert_norm_zero3(eng: DeepSpeedEngine, zero_optimizer: Any) -> None:
    """ZeRO-3's global gradient norm (combined from per-group norms × loss scale) with the split experts'
    norm as one more group."""
    groups = zero_optimizer._get_norm_groups

    def norm_groups() -> list[torch.Tensor]:
        dense = groups()
        expert = math.sqrt(eng._expert_sq) * float(zero_optimizer.loss_scale)
        return [*dense, torch.tensor(expert, dtype=dense[0].dtype, device=dense[0].device)]

    zero_optimizer._get_norm_groups = norm_groups


def _hide_experts(model: nn.Module, shards: Any) -> None:
    """Take the split experts out of the module tree DeepSpeed ZeRO-3 sees (before ``deepspeed.initialize``).

    ZeRO-3 partitions every parameter of the module it is given over all ranks and walks them all in its
    hooks and steps; the experts, already split over cp and reduced over dp by the engine, must stay whole
    on their rank. Each stays an attribute of its module (``self.weight`` still resolves, so forward is
    unchanged) but leaves ``_parameters``: ``parameters()``, ``state_dict()`` and DeepSpeed skip it.
    :class:`_Zero3CheckpointView` names them for checkpoints.
    """
    owners = {id(p) for p in shards.params}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in owners:
                del module._parameters[name]
                module.__dict__[name] = p


def _unhide_experts(model: nn.Module, shards: Any) -> None:
    """Undo :func:`_hide_experts`: each split expert is a registered parameter of its module again."""
    owners = {id(p) for p in shards.params}
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, nn.Parameter) and id(value) in owners:
                del module.__dict__[name]
                module._parameters[name] = value


class _Zero3CheckpointView(nn.Module):
    """The whole model as DCP sees it under ZeRO-3 with split experts: dense weights gathered as DeepSpeed's
    fp32 masters, the experts (out of the module tree, :func:`_hide_experts`) as ``Shard(0)`` DTensors over
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


def build_deepspeed(cfg: EngineConfig, model: nn.Module, optimizer_factory: OptimizerFactory, *,
                    group: Any = None, grad_accum: int = 1, micro_batch_size: int = 1,
                    grad_clip: float | None = None) -> Engine:
    ds = _import_deepspeed()
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("engine.kind=deepspeed needs a distributed launch (torchrun / longreach launch)")
    if group is not None and dist.get_world_size(group) != dist.get_world_size():
        raise ConfigError("engine.kind=deepspeed reduces gradients over all ranks; a sub-group is not supported")
    init_deepspeed_distributed()
    shards = expert_shards(model)
    # ZeRO-0 with split experts: the engine clips dense and expert gradients by one norm itself
    own_clip = shards is not None and cfg.zero_stage == 0
    conf = deepspeed_config(cfg, world_size=dist.get_world_size(), grad_accum=grad_accum,
                            micro_batch_size=micro_batch_size, grad_clip=None if own_clip else grad_clip)
    if shards is not None:
        _check_user_config(cfg, conf)
    if shards is None:
        optimizer = optimizer_factory(model.parameters())
    else:  # split experts: DeepSpeed gets the dense parameters only (class docstring)
        experts = {id(p) for p in shards.params}
        optimizer = optimizer_factory([p for p in model.parameters() if id(p) not in experts])
        # DeepSpeed broadcasts rank 0's module at start and casts it to bf16/fp16: keep this rank's fp32 experts
        local = [p.detach().clone() for p in shards.params]
        if cfg.zero_stage == 3:
            _hide_experts(model, shards)
    ds_engine, ds_opt, _, _ = ds.initialize(model=model, optimizer=optimizer, config=conf)
    eng = DeepSpeedEngine(cfg, ds_engine, ds_engine.module, optimizer, group)
    eng.ds_optimizer = ds_opt
    eng.grad_clip = grad_clip
    if shards is not None:
        for p, mine in zip(shards.params, local):
            p.data = mine
        eng.expert_optimizer = optimizer_factory(shards.params)
        # the factory may make a (no-decay) group that holds no expert; DCP cannot name an empty group
        eng.expert_optimizer.param_groups[:] = [g for g in eng.expert_optimizer.param_groups if g["params"]]
        expert_optimizer_hooks(model, eng.expert_optimizer)
        if hasattr(ds_opt, "bf16_groups"):  # BF16_Optimizer (fp32 gradient accumulation): grads off the params
            raise ConfigError("model.moe.expert_parallel with DeepSpeed's BF16_Optimizer (bf16 with "
                              "data_types.grad_accum_dtype=fp32 in engine.deepspeed_config) is not supported: drop "
                              "that setting")
        if cfg.zero_stage == 0:
            _experts_out_of_allreduce(ds_engine, shards)
        elif cfg.zero_stage == 3:
            _with_expert_norm_zero3(eng, ds_opt)
        else:
            _with_expert_norm(eng, ds_opt)
        if cfg.mixed_precision != "fp32" and cfg.zero_stage < 3:  # ZeRO-3: _Zero3CheckpointView
            _masters_in_state_dict(eng, shards)
    return eng


def _check_user_config(cfg: EngineConfig, conf: dict[str, Any]) -> None:
    """Split experts follow ``engine.options.zero_stage`` and ``train.precision``: an ``engine.deepspeed_config``
    file that changes either would leave them handled for another configuration than DeepSpeed runs."""
    stage = conf.get("zero_optimization", {}).get("stage", 0)
    if stage != cfg.zero_stage:
        raise ConfigError(f"engine.deepspeed_config sets zero_optimization.stage={stage} but "
                          f"engine.options.zero_stage={cfg.zero_stage}; with model.moe.expert_parallel set the stage "
                          "in engine.options.zero_stage only")
    for key, precision in (("bf16", "bf16"), ("fp16", "fp16")):
        if bool(conf.get(key, {}).get("enabled", False)) != (cfg.mixed_precision == precision):
            raise ConfigError(f"engine.deepspeed_config sets {key}.enabled against train.precision="
                              f"{cfg.mixed_precision}; with model.moe.expert_parallel set the precision in "
                              "train.precision only")


def _experts_out_of_allreduce(ds_engine: Any, shards: Any) -> None:
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


def ulysses_attention(local_attention: Callable[..., torch.Tensor], group: Any = None) -> nn.Module:
    """DeepSpeed-Ulysses around a local attention function: the alternative ``ulysses`` strategy.

    The returned module is an ``inner_attention(q, k, v, ctx)`` for the model seam: q, k, v arrive
    as ``[B, S_local, H, D]`` (contiguous layout: rank r holds tokens r·S/P … (r+1)·S/P − 1);
    DeepSpeed's all-to-all turns them into ``[B, S, H/P, D]``, ``local_attention`` runs on the full
    sequence with a head slice, and the inverse all-to-all returns ``[B, S_local, H, D]``.

    Args:
        local_attention: ``(q, k, v, ctx) -> out`` on the full sequence (e.g. ``LocalAttention``).
        group: the context-parallel group (default WORLD).
    Returns:
        An ``nn.Module`` usable as ``inner_attention``.
    """
    _import_deepspeed()
    from deepspeed.sequence.layer import DistributedAttention

    class _Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ctx: Any = None

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return local_attention(q, k, v, self.ctx)  # [B, S, H/P, D]

    class _Ulysses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.local = _Local()
            self.dist_attn = DistributedAttention(self.local, group if group is not None else dist.group.WORLD,
                                                  scatter_idx=2, gather_idx=1)

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Any) -> torch.Tensor:
            p = dist.get_world_size(group)
            if q.shape[2] % p or k.shape[2] % p:
                raise ConfigError(f"DeepSpeed-Ulysses needs the head counts ({q.shape[2]} query, {k.shape[2]} "
                                  f"key/value) divisible by the context-parallel degree {p}")
            self.local.ctx = ctx
            return self.dist_attn(q, k, v, 0)  # batch_dim_idx 0: BSHD

    return _Ulysses()
