"""The job config: one typed dataclass per component, loaded strictly from YAML (ARCHITECTURE.md §2).

    from longreach.configio import load_config
    cfg = load_config(JobConfig, "configs/demo.yaml", ["--train.lr=3e-4", "--parallel.cp=2"])

Sections: ``run`` (:class:`RunConfig`), ``model`` (:class:`~longreach.models.ModelConfig`), ``data``
(:class:`~longreach.data.DataConfig`), ``train`` (:class:`TrainConfig`), ``parallel``
(:class:`~longreach.parallel.ParallelConfig`), ``attention`` (:class:`~longreach.attention.AttentionConfig`),
``checkpoint`` (:class:`~longreach.checkpoint.CheckpointConfig`), ``engine`` (:class:`EngineConfig`),
``faults`` (:class:`~longreach.faults.FaultConfig`: NaN/inf policy, collective timeout, watchdog).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from longreach.attention import AttentionConfig
from longreach.checkpoint import CheckpointConfig
from longreach.data.config import DataConfig
from longreach.engines.base import PRECISIONS, EngineConfig
from longreach.faults import FaultConfig
from longreach.models.config import ModelConfig
from longreach.errors import ConfigError
from longreach.parallel.config import ParallelConfig, check_divisible

SCHEDULES = ("cosine", "constant", "linear")

__all__ = ["AttentionConfig", "CheckpointConfig", "DataConfig", "EngineConfig", "FaultConfig", "JobConfig",
           "ModelConfig", "ParallelConfig", "RunConfig", "TrainConfig"]


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = "run"
    """Run name; the run folder defaults to ``runs/<name>``."""
    out_dir: str | None = None
    """Run folder (metrics.jsonl, config.yaml, checkpoints/); None = ``runs/<name>``."""
    seed: int = 0
    """Seed of model initialisation and data order (the same on every rank)."""
    steps: int = 100
    """Optimizer steps to train (in total, counting steps done before a resume)."""
    log_every: int = 1
    """Log a line every this many steps (metrics.jsonl gets every step)."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    overwrite: bool | str = False
    """Reuse a run folder that holds a run with a different config: ``true`` moves the old run aside to
    ``<out_dir>.replaced-<time>``; ``delete`` deletes it; ``false`` refuses."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        if self.out_dir is None:
            self.out_dir = f"runs/{self.name}"
        for name in ("steps", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.overwrite, str) and self.overwrite not in ("delete", "move"):
            raise ConfigError(f"run.overwrite must be true/false (move aside), or delete; got {self.overwrite!r}")
        if self.overwrite == "move":
            self.overwrite = True
        if self.log_every < 1:
            raise ConfigError(f"run.log_every must be >= 1, got {self.log_every}")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine/linear decay; None = lr / 10."""
    warmup_steps: int = 10
    """Linear warm-up from 0 to ``lr`` over this many steps."""
    schedule: str = field(default="cosine", metadata={"choices": SCHEDULES})
    """After warm-up: cosine | linear decay to ``min_lr`` at ``run.steps``, or constant."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (matrices only; norms and biases get none)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    seq_len: int = 2048
    """Global sequence length (each context-parallel rank holds seq_len / cp tokens)."""
    precision: str = field(default="fp32", metadata={"choices": PRECISIONS})
    """fp32, or bf16/fp16 mixed precision (parameters, gradients and optimizer state stay float32; fp16 needs
    a loss scaler: engine.kind deepspeed or accelerate). The one precision setting: the engine follows it."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in backward instead of keeping its activations."""
    loss_chunk_size: int = 1024
    """Tokens per logits chunk of the loss (memory O(chunk × vocabulary))."""

    def __post_init__(self) -> None:
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if self.lr > 1e30:  # AdamW's step size lr / (1 - beta1**t) must stay a float32 (it overflows near 1e37)
            raise ConfigError(f"train.lr={self.lr:g} is not a usable learning rate (at most 1e30)")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr; got {self.lr}, {self.min_lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("grad_accum", "micro_batch_size", "seq_len", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True, slots=True)
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run folder, seed, length, logging and checkpoint cadence."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data/context parallel degrees, strategy and layout."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Local backend and sparse pattern of the softmax attention layers."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint saving and resuming."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Training engine and its typed options (:class:`~longreach.engines.EngineConfig`)."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Non-finite loss policy (skip/stop), collective timeout (also the process group's), watchdog."""

    def __post_init__(self) -> None:
        check_job_sections(self.train, self.parallel, self.engine)
        moe = self.model.moe
        if moe is not None and moe.expert_parallel and self.parallel.cp > 1:
            # here so a run folder is never started for it (model_setup.parallelize checks again)
            self.engine.with_precision(self.train.precision).require_expert_split()


def check_job_sections(train: TrainConfig, parallel: ParallelConfig, engine: EngineConfig) -> None:
    """Checks across the train, parallel and engine sections (a job's and a fine-tuning job's alike)."""
    try:
        check_divisible(train.seq_len, layout=parallel.layout, cp=parallel.cp, setting="train.seq_len")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if train.precision == "fp16" and engine.kind == "native":
        raise ConfigError("train.precision=fp16 needs a loss scaler: use bf16 with engine.kind=native, or "
                          "engine.kind=deepspeed/accelerate")
