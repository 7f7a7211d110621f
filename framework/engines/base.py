"""What every training engine shares: the typed ``engine:`` config and the :class:`Engine` interface.

The engines are the only place a model is wrapped for data parallelism (DDP, FSDP2, DeepSpeed,
accelerate); ``longreach.model_setup.parallelize`` applies the attention seam, expert parallelism and
activation checkpointing before them. Every engine *averages* gradients over its dp × cp group, as the
libraries do; the trainer multiplies each rank's loss (its summed token loss over the global token count)
by the group size, so the averaged gradient is the gradient of the global mean loss. Split experts are
left out of the library's reduction: the engine divides their gradients by the group size and SUMs them
over the ranks holding the same experts (``longreach.mixtures.expert_parallel``).
"""
from __future__ import annotations

import dataclasses
import difflib
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from longreach.errors import ConfigError

__all__ = ["ENGINES", "Engine", "EngineConfig", "EngineOptions", "OptimizerFactory", "PRECISIONS",
           "as_engine_config", "unwrap"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

ENGINES = ("native", "deepspeed", "accelerate")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(kw_only=True, slots=True)
class EngineOptions:
    """The ``engine.options:`` section: typed, so a misspelt option is rejected when the config loads.
    Precision is not an engine option: ``train.precision`` is the one setting, handed to the engine by the
    trainer (:meth:`EngineConfig.with_precision`)."""

    __removed_keys__: ClassVar[dict[str, str]] = {"mixed_precision": "train.precision (fp32, bf16 or fp16)"}

    fsdp: bool = False
    """native only: shard parameters, gradients and optimizer state with FSDP2 (``fully_shard``)
    over the dp × cp ranks instead of replicating them with DDP."""
    zero_stage: int = 0
    """deepspeed only: ZeRO stage 0-3 (1: optimizer state, 2: + gradients, 3: + parameters)."""
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
        if isinstance(self.zero_stage, bool) or not isinstance(self.zero_stage, int) or not 0 <= self.zero_stage <= 3:
            raise ConfigError(f"engine.options.zero_stage must be 0, 1, 2 or 3; got {self.zero_stage!r}")


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(EngineOptions))


def _options(value: Any) -> EngineOptions:
    """``engine.options`` given as a dict (Python callers, tests) → :class:`EngineOptions`, naming a typo."""
    if isinstance(value, EngineOptions):
        return value
    if value is None:
        return EngineOptions()
    if not isinstance(value, dict):
        raise ConfigError(f"engine.options must be a mapping of engine settings, got {type(value).__name__}")
    for key in value:
        if key in EngineOptions.__removed_keys__:
            raise ConfigError(f"engine.options.{key} was removed; use {EngineOptions.__removed_keys__[key]}")
        if key not in _OPTION_NAMES:
            near = difflib.get_close_matches(str(key), _OPTION_NAMES, n=1)
            raise ConfigError(f"engine.options.{key} is not an engine setting"
                              + (f"; did you mean {near[0]!r}?" if near else f" (valid: {', '.join(_OPTION_NAMES)})"))
    return EngineOptions(**value)


@dataclass(kw_only=True)
class EngineConfig:
    """The ``engine:`` section of a job: which engine, and its typed options.

    The options read as attributes too (``cfg.fsdp``, ``cfg.zero_stage``, …). ``precision`` is not a
    config key (no dataclass field, so never loaded or saved): the trainer sets it from ``train.precision``
    with :meth:`with_precision`.
    """

    kind: str = field(default="native", metadata={"choices": ENGINES})
    """native (torch DDP / FSDP2), deepspeed (ZeRO) or accelerate."""
    options: EngineOptions = field(default_factory=EngineOptions)
    """The engine's settings (:class:`EngineOptions`); a mapping is accepted from Python."""
    precision = "fp32"  # class attribute, not a field: set per instance by with_precision

    def __post_init__(self) -> None:
        self.options = _options(self.options)
        o = self.options
        if self.kind not in ENGINES:
            raise ConfigError(f"engine.kind must be one of {', '.join(ENGINES)}; got {self.kind!r}")
        if o.zero_stage and self.kind != "deepspeed":
            raise ConfigError(f"engine.options.zero_stage={o.zero_stage} needs engine.kind=deepspeed "
                              f"(kind is {self.kind!r}; for native sharding set engine.options.fsdp=true)")
        if o.fsdp and self.kind != "native":
            raise ConfigError(f"engine.options.fsdp=true needs engine.kind=native (kind is {self.kind!r})")
        if o.cpu_offload and self.kind == "native" and not o.fsdp:
            raise ConfigError("engine.options.cpu_offload with engine.kind=native needs engine.options.fsdp=true")
        if o.cpu_offload and self.kind == "deepspeed" and o.zero_stage == 0:
            raise ConfigError("engine.options.cpu_offload with deepspeed needs engine.options.zero_stage >= 1")

    # the options as attributes: what the engines read
    fsdp = property(lambda self: self.options.fsdp)
    zero_stage = property(lambda self: self.options.zero_stage)
    cpu_offload = property(lambda self: self.options.cpu_offload)
    activation_offload = property(lambda self: self.options.activation_offload)
    reshard_after_forward = property(lambda self: self.options.reshard_after_forward)
    deepspeed_config = property(lambda self: self.options.deepspeed_config)

    def with_precision(self, precision: str) -> "EngineConfig":
        """A copy computing in ``precision`` (``train.precision``: fp32, bf16 or fp16; fp16 needs a loss
        scaler, so not with the native engine)."""
        if precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if precision == "fp16" and self.kind == "native":
            raise ConfigError("train.precision=fp16 needs a loss scaler: use bf16 with engine.kind=native, or "
                              "engine.kind=deepspeed/accelerate")
        out = EngineConfig(kind=self.kind, options=dataclasses.replace(self.options))
        out.precision = precision
        return out

    def splits_experts(self) -> bool:
        """Whether this engine keeps split experts (``model.moe.expert_parallel``) out of its own data
        parallelism and reduces them itself: native DDP and FSDP2, accelerate, and DeepSpeed ZeRO 0-3 in
        fp32, bf16 and fp16 (DeepSpeed shards the dense part, the engine steps the experts beside it) except
        ZeRO-0 with fp16. :meth:`expert_split_problem` says why not."""
        return self.expert_split_problem() is None

    def require_expert_split(self) -> None:
        """Raise the ConfigError naming the settings when this engine cannot split experts (what a job with
        ``model.moe.expert_parallel`` under cp > 1 needs)."""
        problem = self.expert_split_problem()
        if problem:
            raise ConfigError(f"model.moe.expert_parallel cannot split the experts under engine.kind={self.kind}: "
                              f"{problem}")

    def expert_split_problem(self) -> str | None:
        """None when this engine splits experts (:meth:`splits_experts`), else what to change."""
        if self.kind != "deepspeed":
            return None
        if self.zero_stage == 0 and self.precision == "fp16":
            return ("train.precision=fp16 with engine.options.zero_stage=0 keeps DeepSpeed's overflow check blind "
                    "to the split experts; use zero_stage 1, 2 or 3, or bf16")
        return None


def as_engine_config(section: Any) -> EngineConfig:
    """An :class:`EngineConfig` from itself, a kind name, or a mapping.

    Mappings may nest the options (``{kind, options: {...}}``, the YAML shape) or list them flat
    (``{kind: "deepspeed", zero_stage: 2}``). Unknown option names are a ConfigError naming them.
    """
    if isinstance(section, EngineConfig):
        return section
    if isinstance(section, str):
        return EngineConfig(kind=section)
    if not isinstance(section, dict):
        raise ConfigError(f"engine: expected an EngineConfig or a mapping, got {type(section).__name__}")
    data = dict(section)
    kind = data.pop("kind", "native")
    options = dict(data.pop("options", None) or {})
    options.update(data)
    return EngineConfig(kind=kind, options=options)


class Engine:
    """What the trainer calls; subclasses fill in the distribution mechanics.

    Attributes:
        model: the module to call in forward (possibly wrapped: DDP, DeepSpeedEngine, ...).
        module: the unwrapped model (attribute access, ``output_weight()``, ...).
        optimizer: the optimizer the LR scheduler drives.
    """

    kind: str = "base"

    def __init__(self, cfg: EngineConfig, model: nn.Module, module: nn.Module,
                 optimizer: torch.optim.Optimizer | None, group: Any = None, *, replicas: int | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.group = group
        if replicas is None:
            replicas = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        self.replicas = replicas
        """Ranks gradients are averaged over (``group``, WORLD when None): the trainer's loss scale."""

    # -- forward
    def autocast(self) -> Any:
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
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

    def sync_gradients(self) -> None:
        """Complete what the library's reduction left out (split experts); once per step, after the last
        backward. Collective."""

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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
