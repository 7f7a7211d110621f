"""The typed config of ``longreach finetune``: the trainer's sections with fine-tuning defaults, plus the
``hf:`` (checkpoint), ``recipe:`` (method, target length, LoRA, RoPE) and ``data:`` sections.

Every section is checked in its own ``__post_init__``; :class:`FinetuneConfig` resolves what depends on
the recipe (the attention pattern's ``auto``, ``train.seq_len`` = ``recipe.target_len``) and then runs the
job-wide checks a ``longreach train`` job runs (:func:`longreach.job.check_job_sections`).

**Checkpoints** are lean by default (``checkpoint.trainable_only: true``): the trainable parameters
(LoRA adapters, embeddings, norms — fp32 master weights; tied embeddings once), their optimizer state, the
LR schedule, the data position and the RNG states, through DCP (resume is exact and reshards across world
sizes; under DeepSpeed its own checkpoint, without the frozen parameters). The frozen base
is re-read from ``hf.path`` on resume; ``hf.base_hash`` (a sha256 of the files in ``hf.path``, filled in at
start) makes a resume against changed base files a clear error instead of a silently different model. Set
``checkpoint.trainable_only: false`` to store the whole model in every checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from longreach.attention import AttentionConfig
from longreach.checkpoint import CheckpointConfig
from longreach.data.config import SOURCES
from longreach.errors import ConfigError
from longreach.faults import FaultConfig
from longreach.hf.recipes import RecipeConfig
from longreach.job import SCHEDULES, EngineConfig, RunConfig, TrainConfig, check_job_sections
from longreach.parallel.config import ParallelConfig, check_divisible

__all__ = ["DTYPES", "FTAttention", "FTCheckpoint", "FTData", "FTRun", "FTTrain", "FT_SOURCES", "FinetuneConfig",
           "HFSource"]

DTYPES = ("auto", "float32", "bfloat16", "float64")
FT_SOURCES = (*SOURCES, "tokens")
_SEQ_LEN_DEFAULT = TrainConfig().seq_len


@dataclass(kw_only=True, slots=True)
class HFSource:
    """The ``hf:`` section: which checkpoint is fine-tuned and how it is loaded."""

    path: str = ""
    """Local HF checkpoint folder to extend (config.json, weights, tokenizer files)."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the checkpoint."""
    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    """Weights as loaded: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32``, ``bfloat16`` or ``float64``.
    With bf16 the frozen weights stay bf16 and compute runs in bf16 (``train.precision`` becomes bf16),
    while the trainable parameters are kept in fp32 — master weights, so the optimizer state is fp32 and
    updates far below bf16's resolution (lr 2e-5 on a norm weight of 1.0) are not lost."""
    base_hash: str = ""
    """sha256 of the files in ``path``, filled in by ``longreach finetune`` when checkpoints are lean
    (``checkpoint.trainable_only``): part of the run's config, so resuming against changed base files is an
    error. Set it to pin the base: a different folder content is then refused at start."""
    pure_bf16: bool = False
    """Keep the trainable parameters (and so the optimizer state) in bf16 too, without fp32 master
    weights: saves memory, but small updates round away (logged as a warning). Only with ``dtype: bfloat16``
    or ``auto`` on GPU."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"hf.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.pure_bf16 and self.dtype not in ("auto", "bfloat16"):
            raise ConfigError(f"hf.pure_bf16 needs hf.dtype bfloat16 or auto (got hf.dtype={self.dtype!r})")


@dataclass(kw_only=True, slots=True)
class FTData:
    """Fine-tuning documents, tokenized with the checkpoint's tokenizer and cut into target_len sequences."""

    source: str = field(default="synthetic", metadata={"choices": FT_SOURCES})
    """``embedded``, ``synthetic`` or ``files`` (longreach's corpus sources), or ``tokens`` (``tokens_path``)."""
    paths: list[str] = field(default_factory=list)
    """For ``files``: text, jsonl or parquet files, saved HF ``datasets`` folders, or folders of files."""
    tokens_path: str | None = None
    """For ``tokens``: a ``.npy`` of token ids or a token-shard folder."""
    synthetic_documents: int = 200
    """Documents of the ``synthetic`` source."""
    passkey_fraction: float = 0.3
    """Share of passkey-retrieval documents in generated sources."""
    task_chars: int = 3000
    """Longest generated task document, in characters."""
    seed: int = 0
    """Seed of generated documents and of the sequence order."""
    text_field: str = "text"
    """The jsonl field / parquet or dataset column holding each document's text."""
    tokenize_workers: int | None = None
    """Tokenizer processes (0: in this process; None: automatic, as ``data.tokenize_workers``)."""

    def __post_init__(self) -> None:
        if self.source not in FT_SOURCES:
            raise ConfigError(f"data.source={self.source!r} is not one of {', '.join(FT_SOURCES)}")
        if self.source == "tokens" and not self.tokens_path:
            raise ConfigError("data.source is 'tokens' but data.tokens_path is not set")
        if self.source == "files" and not self.paths:
            raise ConfigError("data.source is 'files' but data.paths is empty")


@dataclass(kw_only=True, slots=True)
class FTAttention(AttentionConfig):
    """The trainer's ``attention:`` section, whose pattern defaults to the recipe's.

    With ``pattern: auto`` nothing is checked here: :class:`FinetuneConfig` replaces ``auto`` by the
    recipe's pattern, which builds a new section and so runs every check of :class:`AttentionConfig`.
    """

    pattern: str = "auto"
    """``auto`` (the recipe's: s2 for longlora and full, sf for sinklora), or any trainer pattern: full, s2,
    s2_roll (LongLoRA's wrapping path), sf, ssa, window, power, sinks_window."""

    def __post_init__(self) -> None:
        if self.pattern != "auto":
            AttentionConfig.__post_init__(self)


@dataclass(kw_only=True, slots=True)
class FTTrain(TrainConfig):
    """The trainer's ``train:`` section with LongLoRA's defaults (lr 2e-5, no weight decay, 20 warm-up
    steps then constant, AdamW betas (0.9, 0.999)). ``seq_len`` is ``recipe.target_len``."""

    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to ``lr`` over this many steps."""
    schedule: str = field(default="constant", metadata={"choices": SCHEDULES})
    """After warm-up: constant (LongLoRA), or cosine | linear decay to ``min_lr`` at ``run.steps``."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices only)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    sequence_tile: int = 0
    """Tokens per tile of each decoder block's MLP and RMSNorms (and the final norm), each tile recomputed in
    backward so the ``[S, intermediate_size]`` MLP product never exists whole (0: off). What
    ``model.sequence_tile`` is for longreach's own models, applied by the same ``longreach.model_setup.parallelize`` step."""
    checkpoint_offload: bool = False
    """With ``activation_checkpointing``: keep each decoder block's checkpointed input in (pinned) host memory
    between forward and backward, brought back ahead of use on a side stream (CUDA). What
    ``model.checkpoint_offload`` is for longreach's own models."""

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        if self.sequence_tile < 0:
            raise ConfigError(f"train.sequence_tile must be >= 0 (0: no tiling), got {self.sequence_tile}")
        if self.checkpoint_offload and not self.activation_checkpointing:
            raise ConfigError("train.checkpoint_offload moves the checkpointed block inputs to host memory: it "
                              "needs train.activation_checkpointing=true")


@dataclass(kw_only=True, slots=True)
class FTRun(RunConfig):
    """The trainer's ``run:`` section; the export goes to ``<out_dir>/export``."""

    name: str = "finetune"
    """Run name; the run folder defaults to ``runs/<name>``."""
    steps: int = 1000
    """Optimizer steps to train (in total, counting steps done before a resume)."""
    log_every: int = 10
    """Log a line every this many steps (metrics.jsonl gets every step)."""


@dataclass(kw_only=True, slots=True)
class FTCheckpoint(CheckpointConfig):
    """The trainer's ``checkpoint:`` section, lean by default: trainable parameters and optimizer state only."""

    trainable_only: bool = True
    """Save only the trainable parameters (and optimizer state); the frozen base is re-read from
    ``hf.path`` on resume, checked against ``hf.base_hash``. False stores the whole model every time."""


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    """A long-context fine-tuning job of an HF checkpoint (the trainer's sections plus hf/recipe/data)."""

    hf: HFSource = field(default_factory=HFSource)
    """The checkpoint to extend."""
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    """LongLoRA / SinkLoRA / full, target length, LoRA settings, RoPE scaling."""
    attention: FTAttention = field(default_factory=FTAttention)
    """Training attention: pattern (default the recipe's), group_size (0 = target_len / 4), sinks, backend."""
    data: FTData = field(default_factory=FTData)
    """Fine-tuning data."""
    run: FTRun = field(default_factory=FTRun)
    """Run folder, seed, steps, logging and checkpoint cadence."""
    train: FTTrain = field(default_factory=FTTrain)
    """Optimisation (``seq_len`` follows ``recipe.target_len``)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """dp × cp degrees, context-parallel strategy and layout."""
    checkpoint: FTCheckpoint = field(default_factory=FTCheckpoint)
    """Checkpoint saving and resuming (see the module docstring for what a checkpoint holds)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Training engine: native (DDP, or FSDP2 with ``options: {fsdp: true}``), deepspeed, accelerate."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Non-finite loss policy, collective timeout and watchdog."""

    def __post_init__(self) -> None:
        if self.attention.pattern == "auto":
            self.attention = dataclasses.replace(self.attention, pattern=self.recipe.pattern)
        if self.recipe.method == "sinklora" and self.attention.pattern != "sf":
            raise ConfigError(f"recipe.method=sinklora trains with SF-Attn: attention.pattern must be sf "
                              f"(got {self.attention.pattern!r})")
        target = self.recipe.target_len
        if self.train.seq_len not in (target, _SEQ_LEN_DEFAULT):
            raise ConfigError(f"train.seq_len={self.train.seq_len} differs from recipe.target_len={target}: "
                              "a fine-tuning job trains at recipe.target_len; set only that")
        self.train.seq_len = target
        try:
            check_divisible(target, layout=self.parallel.layout, cp=self.parallel.cp, setting="recipe.target_len")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        check_job_sections(self.train, self.parallel, self.engine)
