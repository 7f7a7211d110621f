"""DeepSpeed engine: ZeRO 1/2/3 from a generated DeepSpeed config, and DeepSpeed-Ulysses attention.

On CPU DeepSpeed runs over gloo (``deepspeed.init_distributed(dist_backend="gloo")``). We always
hand DeepSpeed a *torch* optimizer: its fused CPU/GPU optimizers are C++ extensions that compile for
about a minute on first use. For the same reason its shared-memory CPU all-reduce op is switched off
before DeepSpeed's communication layer starts (gloo does the reductions; the op only speeds up
``ccl`` on Xeon hosts).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from longreach.engines import Engine, EngineConfig, OptimizerFactory
from longreach.errors import ConfigError


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


def splits_experts(cfg: EngineConfig) -> bool:
    """Whether split experts (``model.moe.expert_parallel``) stay split under this DeepSpeed config.

    ZeRO 1 and 2 in fp32: DeepSpeed shards the dense part and never sees the experts (see
    :class:`DeepSpeedEngine`). Other stages and precisions keep the layer's replicated-parameter mode.
    """
    return cfg.kind == "deepspeed" and cfg.zero_stage in (1, 2) and cfg.mixed_precision == "fp32"


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine; with split experts (ZeRO 1/2, fp32) it owns them beside DeepSpeed.

    DeepSpeed is given the dense parameters only (ZeRO shards their optimizer state and gradients). The
    expert parameters, split over cp by ``parallelize``, have their own torch optimizer here: at each
    accumulation boundary their gradients are SUM-reduced over the dp replicas (``reduce_expert_gradients``),
    their squared norm joins DeepSpeed's global norm (one clip coefficient for everything), and they are
    stepped with the LR DeepSpeed's optimizer uses. Checkpoints: DeepSpeed's own files hold the dense part;
    the expert weights and moments go through DCP as ``Shard(0)`` DTensors over cp (:meth:`checkpoint_state`).
    """

    kind = "deepspeed"
    expert_optimizer: torch.optim.Optimizer | None = None
    _expert_sq: float = 0.0

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer normalises the loss by the global token count itself: no 1/grad_accum scaling.
        self.model.backward(loss, scale_wrt_gas=False)
        self._grad_norm = None
        boundary = self.model.is_gradient_accumulation_boundary()
        if self.cfg.zero_stage == 0 and boundary:
            # ZeRO-0 with a torch optimizer does not record a global norm: measure the (reduced) grads
            norms = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.stack(norms).norm()) if norms else 0.0
        held = self._take_expert_gradients() if boundary and self.expert_optimizer is not None else None
        # DeepSpeed counts micro-steps in step(); it only updates at the accumulation boundary.
        self.model.step()
        if held is not None:
            self._step_experts(held)

    def _take_expert_gradients(self) -> list[torch.Tensor]:
        """Complete the expert gradients (undo the trainer's replica scale, sum over dp replicas), record
        their squared norm over the cp group, and keep them away from DeepSpeed's step."""
        from longreach.parallelize import expert_shards, reduce_expert_gradients

        shards = expert_shards(self.module)
        n = dist.get_world_size()  # the trainer scales the loss by the dp × cp replica count for engines
        for p in shards.params:
            if p.grad is not None:
                p.grad.div_(n)
        reduce_expert_gradients(self.module)
        grads = [p.grad for p in shards.params]
        sq = torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum().view(1)
        dist.all_reduce(sq, group=shards.ep_mesh.get_group())  # each expert lives on one cp rank
        self._expert_sq = float(sq)
        for p in shards.params:
            p.grad = None
        return grads

    def _step_experts(self, grads: list[torch.Tensor]) -> None:
        from longreach.parallelize import expert_shards

        max_norm = self.grad_clip or 0.0
        total = self.model.get_global_grad_norm()  # DeepSpeed's norm, experts included (see build)
        coef = 1.0
        if max_norm > 0 and total is not None:
            coef = 1.0 / max(1.0, (float(total) + 1e-6) / max_norm)  # DeepSpeed's own clip rule
        for p, g in zip(expert_shards(self.module).params, grads):
            p.grad = g.mul_(coef)
        lr = self.optimizer.param_groups[0]["lr"]  # the schedule drives DeepSpeed's optimizer
        for group in self.expert_optimizer.param_groups:
            group["lr"] = lr
        self.expert_optimizer.step()
        self.expert_optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        # DeepSpeed clips inside its step (config "gradient_clipping"); report what it measured.
        norm = self.model.get_global_grad_norm()
        if norm is None:
            norm = getattr(self, "_grad_norm", None)
        return float(norm) if norm is not None else 0.0

    def step(self) -> None:
        pass  # done in backward() at the accumulation boundary

    def skip_step(self) -> None:
        self.model.zero_grad()

    def no_sync(self) -> Any:
        from contextlib import nullcontext

        return nullcontext()  # DeepSpeed defers reduction to the boundary on its own

    def checkpoint_state(self) -> dict[str, Any]:
        if self.expert_optimizer is None:
            return {"engine": self.model}
        # DeepSpeed's files get the model with this rank's plain expert tensors (rank 0's copy is what
        # DeepSpeed keeps, and DCP's expert state loads after it); DCP gets every rank's experts.
        return {"engine": _PlainExpertsEngine(self.model, self.module), "model": self.module,
                "expert_optimizer": self.expert_optimizer}


    def close(self) -> None:
        """Hand the module back with the fp32 master weights in its trainable parameters.

        DeepSpeed's bf16 modes keep bf16 copies in the module and the fp32 masters in the optimizer: an
        update at lr 2e-5 moves the master of a norm weight of 1.0 but not its bf16 copy, so whatever
        reads the module after training (probe, export) would silently drop it. ZeRO-3 parameters stay
        partitioned (the export gathers them).
        """
        if not self.model.bfloat16_enabled() or self.cfg.zero_stage == 3:
            return
        opt = self.model.optimizer
        if hasattr(opt, "fp16_groups"):  # ZeRO-0: DeepSpeed's fp16 wrappers (fused: flat masters; unfused: lists)
            from torch._utils import _unflatten_dense_tensors

            flat = getattr(opt, "fp32_groups_flat", None)
            masters = ([_unflatten_dense_tensors(f, ps) for f, ps in zip(flat, opt.fp16_groups)] if flat is not None
                       else opt.fp32_groups)
            for params, group in zip(opt.fp16_groups, masters):
                for p, master in zip(params, group):
                    p.data = master.detach().clone()
            return
        from deepspeed.utils import safe_get_full_fp32_param  # ZeRO 1/2: linked high-precision partitions

        for p in self.module.parameters():
            master = safe_get_full_fp32_param(p) if p.requires_grad else None
            if master is not None:
                p.data = master.detach().to(p.device).clone()


class _PlainExpertsEngine:
    """A DeepSpeed engine's save/load with the model's expert weights as plain local tensors."""

    def __init__(self, engine: Any, module: nn.Module) -> None:
        self.engine, self.module = engine, module

    def _plain(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from longreach.parallelize import expert_shards

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


def build_deepspeed(cfg: EngineConfig, model: nn.Module, optimizer_factory: OptimizerFactory, *,
                    group: Any = None, grad_accum: int = 1, micro_batch_size: int = 1,
                    grad_clip: float | None = None) -> Engine:
    ds = _import_deepspeed()
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("engine.kind=deepspeed needs a distributed launch (torchrun / longreach launch)")
    if group is not None and dist.get_world_size(group) != dist.get_world_size():
        raise ConfigError("engine.kind=deepspeed reduces gradients over all ranks; a sub-group is not supported")
    init_deepspeed_distributed()
    conf = deepspeed_config(cfg, world_size=dist.get_world_size(), grad_accum=grad_accum,
                            micro_batch_size=micro_batch_size, grad_clip=grad_clip)
    from longreach.parallelize import expert_optimizer_hooks, expert_shards

    shards = expert_shards(model)
    if shards is None:
        optimizer = optimizer_factory(model.parameters())
    else:  # split experts: DeepSpeed gets the dense parameters only (class docstring)
        experts = {id(p) for p in shards.params}
        optimizer = optimizer_factory([p for p in model.parameters() if id(p) not in experts])
        local = [p.detach().clone() for p in shards.params]  # DeepSpeed broadcasts rank 0's module at start
    ds_engine, ds_opt, _, _ = ds.initialize(model=model, optimizer=optimizer, config=conf)
    eng = DeepSpeedEngine(cfg, ds_engine, ds_engine.module, optimizer, group)
    eng.ds_optimizer = ds_opt
    eng.grad_clip = grad_clip
    if shards is not None:
        with torch.no_grad():
            for p, mine in zip(shards.params, local):
                p.copy_(mine)
        eng.expert_optimizer = optimizer_factory(shards.params)
        # the factory may make a (no-decay) group that holds no expert; DCP cannot name an empty group
        eng.expert_optimizer.param_groups[:] = [g for g in eng.expert_optimizer.param_groups if g["params"]]
        expert_optimizer_hooks(model, eng.expert_optimizer)
        _with_expert_norm(eng, ds_opt)
    return eng


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
