"""DeepSpeed engine: ZeRO 0-3 from a generated DeepSpeed config, and DeepSpeed-Ulysses attention.

Experts split over cp stay beside DeepSpeed's data parallelism (:class:`DeepSpeedEngine`; the changes to
DeepSpeed's engine and optimizers that this needs are in ``longreach.engines.deepspeed_experts``).

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
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from longreach.errors import ConfigError
from longreach.mixtures.expert_parallel import (expert_norm_sq, expert_optimizer_hooks, expert_shards,
                                                finish_expert_gradients)

from .base import Engine, EngineConfig, OptimizerFactory
from .deepspeed_experts import (PlainExpertsEngine, Zero3CheckpointView, check_user_config, experts_out_of_allreduce,
                                hide_experts, masters_in_state_dict, unhide_experts, with_expert_norm,
                                with_expert_norm_zero3)


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
    if cfg.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
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
        model = Zero3CheckpointView(self.module, expert_shards(self.module)) if self.cfg.zero_stage == 3 else self.module
        return {"engine": PlainExpertsEngine(self.model, self.module), "model": model,
                "expert_optimizer": self.expert_optimizer}

    def dense_masters(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(module parameter, its fp32 master)`` for DeepSpeed's trainable parameters under bf16/fp16 (ZeRO
        0-2; the masters are DeepSpeed's, full size); empty in fp32, where the module holds the masters.
        Collective under ZeRO 1/2 (the partitions are gathered)."""
        if self.cfg.precision == "fp32" or self.cfg.zero_stage == 3:
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
            unhide_experts(self.module, shards)  # DeepSpeed is done with the module: experts back in the tree
        if not self.model.bfloat16_enabled():
            return
        for p, master in self.dense_masters():
            p.data = master.detach().clone()


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
        check_user_config(cfg, conf)
    if shards is None:
        optimizer = optimizer_factory(model.parameters())
    else:  # split experts: DeepSpeed gets the dense parameters only (class docstring)
        experts = {id(p) for p in shards.params}
        optimizer = optimizer_factory([p for p in model.parameters() if id(p) not in experts])
        # DeepSpeed broadcasts rank 0's module at start and casts it to bf16/fp16: keep this rank's fp32 experts
        local = [p.detach().clone() for p in shards.params]
        if cfg.zero_stage == 3:
            hide_experts(model, shards)
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
            experts_out_of_allreduce(ds_engine, shards)
        elif cfg.zero_stage == 3:
            with_expert_norm_zero3(eng, ds_opt)
        else:
            with_expert_norm(eng, ds_opt)
        if cfg.precision != "fp32" and cfg.zero_stage < 3:  # ZeRO-3: Zero3CheckpointView
            masters_in_state_dict(eng, shards)
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
