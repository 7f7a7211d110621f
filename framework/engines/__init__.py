"""Training engines: how the model, its gradients and its optimizer are distributed.

The trainer talks to one :class:`Engine` whatever runs underneath — native torch (DDP or FSDP2),
DeepSpeed (ZeRO 1-3) or accelerate — chosen by the ``engine:`` config section. Context parallelism is
independent of the engine: it lives in the model's ``inner_attention`` seam (applied by
``parallelize``) and every engine reduces gradients over the whole dp × cp group.

    engine = build_engine(cfg.engine, model, lambda params: torch.optim.AdamW(params, lr=...),
                          group=None, grad_accum=2)
    with engine.forward_context():
        loss = loss_fn(engine.model(x))
    engine.backward(loss)
    grad_norm = engine.clip_grad_norm(1.0)
    engine.step()
    ckpt.save(step, {**engine.checkpoint_state(), "scheduler": sched, ...})
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from longreach.errors import ConfigError

__all__ = ["EngineConfig", "Engine", "build_engine", "OptimizerFactory"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

_KINDS = ("native", "deepspeed", "accelerate")
_PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    kind: str = "native"
    """native (torch DDP / FSDP2), deepspeed (ZeRO) or accelerate."""
    fsdp: bool = False
    """native only: shard parameters, gradients and optimizer state with FSDP2 (``fully_shard``)
    over the dp × cp ranks instead of replicating them with DDP."""
    zero_stage: int = 0
    """deepspeed only: ZeRO stage 0-3 (1: optimizer state, 2: + gradients, 3: + parameters)."""
    mixed_precision: str = "fp32"
    """fp32, bf16 or fp16 (fp16 only with deepspeed/accelerate on GPU: it needs a loss scaler)."""
    cpu_offload: bool = False
    """Offload parameters/optimizer state to host memory: FSDP2 ``CPUOffloadPolicy`` (needs an
    accelerator) or DeepSpeed ZeRO ``offload_optimizer`` (stage >= 1)."""
    activation_offload: bool = False
    """Keep saved activations in host memory between forward and backward
    (``torch.autograd.graph.save_on_cpu``)."""
    reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters after forward (ZeRO-3 style); False keeps them (ZeRO-2 style)."""
    deepspeed_config: str | None = None
    """deepspeed only: a JSON file whose keys override the generated DeepSpeed config."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"engine.kind must be one of {', '.join(_KINDS)}; got {self.kind!r}")
        if self.mixed_precision not in _PRECISIONS:
            raise ConfigError(f"engine.mixed_precision must be one of {', '.join(_PRECISIONS)}; "
                              f"got {self.mixed_precision!r}")
        if not isinstance(self.zero_stage, int) or not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"engine.zero_stage must be 0, 1, 2 or 3; got {self.zero_stage!r}")
        if self.zero_stage and self.kind != "deepspeed":
            raise ConfigError(f"engine.zero_stage={self.zero_stage} needs engine.kind=deepspeed "
                              f"(kind is {self.kind!r}; for native sharding set engine.fsdp=true)")
        if self.fsdp and self.kind != "native":
            raise ConfigError(f"engine.fsdp=true needs engine.kind=native (kind is {self.kind!r})")
        if self.mixed_precision == "fp16" and self.kind == "native":
            raise ConfigError("engine.mixed_precision=fp16 needs a loss scaler: use bf16 with engine.kind=native, "
                              "or engine.kind=deepspeed/accelerate")
        if self.cpu_offload and self.kind == "native" and not self.fsdp:
            raise ConfigError("engine.cpu_offload with engine.kind=native needs engine.fsdp=true")
        if self.cpu_offload and self.kind == "deepspeed" and self.zero_stage == 0:
            raise ConfigError("engine.cpu_offload with deepspeed needs engine.zero_stage >= 1")


class Engine:
    """What the trainer calls; subclasses fill in the distribution mechanics.

    Attributes:
        model: the module to call in forward (possibly wrapped: DDP, DeepSpeedEngine, ...).
        module: the unwrapped model (attribute access, ``output_weight()``, ...).
        optimizer: the optimizer the LR scheduler drives.
    """

    kind: str = "base"

    def __init__(self, cfg: EngineConfig, model: nn.Module, module: nn.Module,
                 optimizer: torch.optim.Optimizer, group: Any = None) -> None:
        self.cfg = cfg
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.group = group

    # -- forward
    def autocast(self) -> Any:
        if self.cfg.mixed_precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float16
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device, dtype=dtype)

    @contextmanager
    def forward_context(self) -> Iterator[None]:
        """Autocast (mixed precision) and activation offload around forward + loss."""
        with ExitStack() as stack:
            stack.enter_context(self.autocast())
            if self.cfg.activation_offload:
                stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
            yield

    def no_sync(self) -> Any:
        """Skip gradient reduction for a micro-batch that is not the last of an accumulation."""
        return nullcontext()

    # -- backward / step
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Clip gradients to ``max_norm`` (None/0: only measure). Returns the global gradient norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        """Discard this step's gradients (non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """The entries this engine contributes to ``CheckpointManager.save/load``'s state dict."""
        return {"model": self.model, "optimizer": self.optimizer}

    def close(self) -> None:
        pass


def build_engine(cfg: EngineConfig, model: nn.Module, optimizer_factory: OptimizerFactory, *,
                 group: Any = None, mesh: Any = None, grad_accum: int = 1,
                 micro_batch_size: int = 1, grad_clip: float | None = None) -> Engine:
    """Wrap ``model`` and build its optimizer for the configured engine.

    Args:
        cfg: the ``engine:`` section.
        model: the (already parallelized: CP seam swapped, activation checkpointing applied) model.
        optimizer_factory: ``params -> torch.optim.Optimizer``; called on the wrapped model's
            parameters (FSDP2 DTensors, DeepSpeed's partitions are handled by the engine).
        group: process group over which gradients are reduced (the whole dp × cp group; default WORLD).
        mesh: optional DeviceMesh with dims ("dp", "cp"); FSDP2 shards over its flattened dp × cp.
        grad_accum: micro-batches per optimizer step (DeepSpeed needs it in its config).
        micro_batch_size: per-rank micro-batch size (DeepSpeed config bookkeeping only).
        grad_clip: gradient clipping for DeepSpeed (which clips inside its step).
    Returns:
        The engine.
    """
    if cfg.kind == "native":
        from longreach.engines.native import build_native

        return build_native(cfg, model, optimizer_factory, group=group, mesh=mesh)
    if cfg.kind == "deepspeed":
        from longreach.engines.deepspeed import build_deepspeed

        return build_deepspeed(cfg, model, optimizer_factory, group=group, grad_accum=grad_accum,
                               micro_batch_size=micro_batch_size, grad_clip=grad_clip)
    from longreach.engines.accelerate import build_accelerate

    return build_accelerate(cfg, model, optimizer_factory, group=group)


def as_engine_config(section: Any) -> EngineConfig:
    """Turn the job's ``engine:`` section into an :class:`EngineConfig`.

    Accepts an :class:`EngineConfig`, a ``{kind, options: {...}}`` section (``longreach.job``'s
    ``EngineConfig``), or a plain dict/str. Unknown option names are a ConfigError naming them.
    """
    import dataclasses
    import difflib

    if isinstance(section, EngineConfig):
        return section
    if isinstance(section, str):
        return EngineConfig(kind=section)
    if isinstance(section, dict):
        data = dict(section)
    else:
        data = {"kind": getattr(section, "kind", "native"), **dict(getattr(section, "options", {}) or {})}
    if isinstance(data.get("options"), dict):
        data.update(data.pop("options"))
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"engine.options.{key} is not an engine setting"
                              + (f"; did you mean {near[0]!r}?" if near else f" (valid: {', '.join(names)})"))
    return EngineConfig(**data)
