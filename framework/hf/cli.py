"""``longreach finetune CONFIG [--section.field=value …]``: extend an HF checkpoint's context.

A fine-tuning job runs through the shared trainer (:func:`longreach.trainer.train`): the same loop,
engines (DDP, FSDP2, DeepSpeed, accelerate), gradient accumulation and clipping, LR schedule, logging,
``metrics.jsonl``, run-folder protection, and :class:`~longreach.checkpoint.CheckpointManager`
checkpoints with automatic resume — rerun the same command after an interruption and it continues
from the latest checkpoint in ``run.out_dir``. What is specific to HF fine-tuning enters through the
trainer's two seams:

* the model (:func:`longreach.hf.model.build_hf_model`): load ``hf.path``, apply ``recipe`` (RoPE
  scaling written into the config; LoRA via peft plus trainable embeddings and norms, or full),
  patch attention through transformers' registry; ``parallelize`` then installs the same local /
  context-parallel inner attention it installs in our own models, from ``attention`` and ``parallel``,
  and applies the same memory steps to the HF decoder blocks: ``train.sequence_tile`` (MLP and norms over
  token tiles), ``train.activation_checkpointing`` and ``train.checkpoint_offload`` (see :class:`FTTrain`);
* the data (:class:`TokenWindows`): the corpus tokenized with the checkpoint's tokenizer, cut into
  ``recipe.target_len`` windows, labels shifted on the global sequence; its position is checkpointed.

After the last step rank 0 merges LoRA and exports a plain HF checkpoint with the tokenizer files to
``<run.out_dir>/export``.

**Checkpoints** are lean by default (``checkpoint.trainable_only: true``): the trainable parameters
(LoRA adapters, embeddings, norms — fp32 master weights; tied embeddings once), their optimizer state, the
LR schedule, the data position and the RNG states, through DCP (resume is exact and reshards across world
sizes; under DeepSpeed its own checkpoint, without the frozen parameters). The frozen base
is re-read from ``hf.path`` on resume; ``hf.base_hash`` (a sha256 of the files in ``hf.path``, filled in at
start) makes a resume against changed base files a clear error instead of a silently different model. Set
``checkpoint.trainable_only: false`` to store the whole model in every checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from longreach.attention import AttentionConfig
from longreach.checkpoint import CheckpointConfig
from longreach.errors import ConfigError, UserError
from longreach.faults import FaultConfig
from longreach.hf.recipes import RecipeConfig
from longreach.job import EngineConfig, RunConfig, TrainConfig
from longreach.parallel.config import ParallelConfig

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float64")
_SEQ_LEN_DEFAULT = TrainConfig().seq_len


@dataclass(kw_only=True, slots=True)
class HFSource:
    """The ``hf:`` section: which checkpoint is fine-tuned and how it is loaded."""

    path: str = ""
    """Local HF checkpoint folder to extend (config.json, weights, tokenizer files)."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the checkpoint."""
    dtype: str = "auto"
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

    source: str = "synthetic"
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
        if self.source not in ("embedded", "synthetic", "files", "tokens"):
            raise ConfigError(f"data.source={self.source!r} is not one of embedded, synthetic, files, tokens")
        if self.source == "tokens" and not self.tokens_path:
            raise ConfigError("data.source is 'tokens' but data.tokens_path is not set")
        if self.source == "files" and not self.paths:
            raise ConfigError("data.source is 'files' but data.paths is empty")


@dataclass(kw_only=True, slots=True)
class FTAttention(AttentionConfig):
    """The trainer's ``attention:`` section, whose pattern defaults to the recipe's."""

    pattern: str = "auto"
    """``auto`` (the recipe's: s2 for longlora and full, sf for sinklora), or any trainer pattern: full, s2,
    s2_roll (LongLoRA's wrapping path), sf, ssa, window, power, sinks_window."""

    def __post_init__(self) -> None:
        chosen = self.pattern
        if chosen == "auto":  # the other fields are checked as usual; FinetuneConfig resolves the pattern
            self.pattern = "full"
        AttentionConfig.__post_init__(self)
        self.pattern = chosen


@dataclass(kw_only=True, slots=True)
class FTTrain(TrainConfig):
    """The trainer's ``train:`` section with LongLoRA's defaults (lr 2e-5, no weight decay, 20 warm-up
    steps then constant, AdamW betas (0.9, 0.999)). ``seq_len`` is ``recipe.target_len``."""

    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to ``lr`` over this many steps."""
    schedule: str = field(default="constant", metadata={"choices": ("cosine", "constant", "linear")})
    """After warm-up: constant (LongLoRA), or cosine | linear decay to ``min_lr`` at ``run.steps``."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices only)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    sequence_tile: int = 0
    """Tokens per tile of each decoder block's MLP and RMSNorms (and the final norm), each tile recomputed in
    backward so the ``[S, intermediate_size]`` MLP product never exists whole (0: off). What
    ``model.sequence_tile`` is for longreach's own models, applied by the same ``longreach.parallelize`` step."""
    checkpoint_offload: bool = False
    """With ``activation_checkpointing``: keep each decoder block's checkpointed input in (pinned) host memory
    between forward and backward, brought back ahead of use on a side stream (CUDA). What
    ``model.checkpoint_offload`` is for longreach's own models."""

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        if self.sequence_tile < 0:
            raise ValueError(f"train.sequence_tile must be >= 0 (0: no tiling), got {self.sequence_tile}")
        if self.checkpoint_offload and not self.activation_checkpointing:
            raise ValueError("train.checkpoint_offload moves the checkpointed block inputs to host memory: it "
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
            self.attention.pattern = self.recipe.pattern
        if self.recipe.method == "sinklora" and self.attention.pattern != "sf":
            raise ConfigError(f"recipe.method=sinklora trains with SF-Attn: attention.pattern must be sf "
                              f"(got {self.attention.pattern!r})")
        target = self.recipe.target_len
        if self.train.seq_len != target:
            if self.train.seq_len != _SEQ_LEN_DEFAULT:
                raise ConfigError(f"train.seq_len={self.train.seq_len} differs from recipe.target_len={target}: "
                                  "a fine-tuning job trains at recipe.target_len; set only that")
            self.train.seq_len = target
        from longreach.parallel.layouts import layout_multiple

        m = layout_multiple(self.parallel.layout, self.parallel.cp)
        if target % m:
            raise ConfigError(f"recipe.target_len={target} must divide by {m} "
                              f"(parallel.layout {self.parallel.layout!r} on parallel.cp={self.parallel.cp})")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def tokenize_corpus(data: FTData, tokenizer: Any, *, trust_remote_code: bool = False) -> Any:
    """All fine-tuning tokens as one flat sequence, each document followed by the tokenizer's eos.

    Text sources go through the shared streaming path (:func:`longreach.data.shards.stream_shards`):
    tokenized once per (corpus content, tokenizer files) by worker processes into cached, memory-mapped
    shards, which every rank, restart and run reuses; local rank 0 builds, the other local ranks wait.

    Returns:
        A :class:`~longreach.data.stream.TokenStream` (``len``, ``[a:b]`` → int64 ``[b − a]``; nothing
        loaded), or for ``source: tokens`` the loaded ``[N]`` int64 array.
    """
    if data.source == "tokens":
        from longreach.evaluation.perplexity import load_tokens

        return np.asarray(load_tokens(data.tokens_path, tokenizer), dtype=np.int64)
    from longreach.data.config import DataConfig
    from longreach.data.shards import TokenShards, stream_shards
    from longreach.data.stream import TokenStream
    from longreach.data.tokenizer import cache_root, local_rank

    dcfg = DataConfig(source=data.source, paths=list(data.paths), synthetic_documents=data.synthetic_documents,
                      passkey_fraction=data.passkey_fraction, recall_fraction=0.0, task_chars=data.task_chars,
                      seed=data.seed, tokenizer=None, vocab_size=1024, text_field=data.text_field,
                      tokenize_workers=data.tokenize_workers)
    folder = stream_shards(dcfg, tokenizer, cache_root(None), bos=False, eos=True, wait=local_rank() != 0,
                           trust_remote_code=trust_remote_code)
    return TokenStream(TokenShards(folder))


class TokenWindows:
    """This dp rank's fine-tuning batches: disjoint ``seq_len`` windows, reshuffled each epoch.

    Yields ``{"input_ids": [batch, seq_len], "labels": [batch, seq_len]}`` with labels shifted on the global
    sequence (the last position ignored). Its position (epoch, batch index) is its ``state_dict``, which
    the trainer checkpoints per rank, so a resumed run draws exactly the batches it would have drawn.

    Only the windows this rank draws are read (``tokens`` may be a memory-mapped
    :class:`~longreach.data.stream.TokenStream`).

    Args:
        tokens: ``[N]`` the whole token stream (anything with ``len`` and ``[a:b]`` slicing).
        seq_len: tokens per window (``recipe.target_len``).
        batch: windows per micro-batch (``train.micro_batch_size``).
        dp_rank, dp_size: this rank's data-parallel coordinates (each epoch's order is split over dp).
        seed: seed of the order (epoch e uses ``default_rng([seed, e])``).

    Raises:
        UserError: fewer windows than one micro-batch per dp rank.
    """

    def __init__(self, tokens: Any, seq_len: int, *, batch: int, dp_rank: int, dp_size: int,
                 seed: int) -> None:
        n = len(tokens) // seq_len
        if n < batch * dp_size:
            raise UserError(f"the fine-tuning data has {len(tokens)} tokens: fewer than {batch * dp_size} sequences "
                            f"of {seq_len} (train.micro_batch_size × dp); add data or shorten recipe.target_len")
        self.tokens, self.num_windows, self.seq_len = tokens, n, seq_len
        self.batch, self.dp_rank, self.dp_size, self.seed = batch, dp_rank, dp_size, seed
        self.epoch = 0
        self.index = 0  # batches drawn in this epoch

    def _mine(self) -> np.ndarray:
        n = self.num_windows
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        per = n // self.dp_size
        return order[self.dp_rank * per:(self.dp_rank + 1) * per]

    def __iter__(self) -> "TokenWindows":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        from longreach.hf.patch import shift_labels

        mine = self._mine()
        start = self.index * self.batch
        if start + self.batch > len(mine):
            self.epoch, self.index, start = self.epoch + 1, 0, 0
            mine = self._mine()
        self.index += 1
        s = self.seq_len
        ids = torch.stack([torch.as_tensor(np.asarray(self.tokens[w * s:(w + 1) * s], dtype=np.int64))
                           for w in mine[start:start + self.batch].tolist()])  # [batch, seq_len]
        return {"input_ids": ids, "labels": shift_labels(ids)}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def load_tokenizer(cfg: FinetuneConfig) -> Any:
    """The checkpoint's tokenizer, or None when it has none (then ``data.source`` must be ``tokens``)."""
    folder = Path(cfg.hf.path)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        if cfg.data.source != "tokens":
            raise UserError(f"{folder}: no tokenizer files; use data.source: tokens")
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.hf.trust_remote_code,
                                         local_files_only=True)


def finetune(cfg: FinetuneConfig, *, probe_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Run the job through the shared trainer, then export; every rank calls it.

    Resumes from the latest checkpoint in ``cfg.run.out_dir`` when there is one (``checkpoint.resume``).

    Args:
        cfg: the job.
        probe_ids: ``[1, S]`` tokens whose logits the fine-tuned, still patched model computes in eval
            mode (full causal attention, sharded as in training) before export — ``summary["probe_logits"]``
            ``[1, S, V]``, for checking the exported checkpoint against it.

    Returns:
        The trainer's summary plus ``losses`` (per step, from ``metrics.jsonl``: the whole run's, across
        resumes), ``trainable`` (parameter counts), ``rope_parameters`` and ``export`` (rank 0's folder).
    """
    from longreach.hf.export import checkpoint_dtype, export_hf, run_on_rank0
    from longreach.hf.model import build_hf_model
    from longreach.hf.recipes import trainable_summary
    from longreach.metrics import read_metrics
    from longreach.trainer import setup_distributed, train

    if not cfg.hf.path:
        raise ConfigError("hf.path: set the HF checkpoint folder to fine-tune")
    if not (Path(cfg.hf.path) / "config.json").is_file():
        raise UserError(f"hf.path: {cfg.hf.path} is not a HuggingFace checkpoint folder (no config.json)")
    from transformers import AutoConfig

    from longreach.hf.rope import rope_parameters_for

    # RoPE settings are checked before anything is written (a target not longer than the original context)
    rope_parameters_for(AutoConfig.from_pretrained(cfg.hf.path, trust_remote_code=cfg.hf.trust_remote_code,
                                                   local_files_only=True), cfg.recipe.rope, target_len=cfg.recipe.target_len)
    # the group outlives train(): probe and export use it
    rank, _, device, owned = setup_distributed(timeout_s=cfg.faults.collective_timeout_s)
    try:
        _bf16_compute(cfg, device)
        if cfg.checkpoint.trainable_only:
            _check_base(cfg, rank)
        tokenizer = load_tokenizer(cfg)
        built: list[torch.nn.Module] = []

        def build_model(job: FinetuneConfig, device: torch.device) -> torch.nn.Module:
            built.append(build_hf_model(job, device))
            return built[-1]

        def build_data(job: FinetuneConfig, *, dp_rank: int, dp_size: int) -> TokenWindows:
            tokens = tokenize_corpus(job.data, tokenizer, trust_remote_code=job.hf.trust_remote_code)
            return TokenWindows(tokens, job.recipe.target_len, batch=job.train.micro_batch_size, dp_rank=dp_rank,
                                dp_size=dp_size, seed=job.data.seed)

        summary = train(cfg, build_model=build_model, build_data=build_data)
        model = built[-1]
        _gather_full_parameters(model)
        if dist.is_initialized():
            dist.barrier()  # rank 0 has written metrics.jsonl
        summary["losses"] = [r["loss"] for r in read_metrics(Path(summary["metrics"]))]
        summary["trainable"] = trainable_summary(model.model)
        summary["rope_parameters"] = getattr(model.hf.config, "rope_parameters", None)
        model.eval()
        if probe_ids is not None:
            dev = next(model.parameters()).device
            # bf16 compute as in training (fp32 trainable parameters beside a bf16 frozen base)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
                summary["probe_logits"] = probe_logits(model, probe_ids.to(dev))

        def write_export() -> None:  # rank 0; the others wait without the step-sized collective timeout
            out = Path(summary["run_dir"])
            export_hf(model.model, out / "export", tokenizer_dir=cfg.hf.path, dtype=checkpoint_dtype(cfg.hf.path))
            summary["export"] = str(out / "export")
            (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "probe_logits"},
                                                         indent=1, default=str))

        run_on_rank0(write_export)
        return summary
    finally:
        if owned:
            dist.destroy_process_group()


def base_files_hash(folder: str | Path) -> str:
    """sha256 over the names and contents of the files in an HF checkpoint folder (hidden files skipped).

    Raises:
        UserError: the folder cannot be read.
    """
    import hashlib

    h = hashlib.sha256()
    try:
        for f in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
    except OSError as exc:
        raise UserError(f"hf.path: cannot read {folder}: {exc.strerror or exc}") from None
    return h.hexdigest()


def _check_base(cfg: FinetuneConfig, rank: int) -> None:
    """Fill ``hf.base_hash`` (rank 0 hashes, every rank receives it) and refuse a base that changed since
    ``hf.base_hash`` was pinned or this run folder's checkpoints were written; collective."""
    import yaml

    from longreach.checkpoint import find_checkpoint

    err, digest = None, ""
    if rank == 0:
        try:
            log.info("hashing the base checkpoint's files in %s (lean checkpoints re-read them on resume)", cfg.hf.path)
            digest = base_files_hash(cfg.hf.path)
            if cfg.hf.base_hash and cfg.hf.base_hash != digest:
                raise UserError(f"hf.base_hash: the files in hf.path={cfg.hf.path} hash to {digest[:16]}…, not the "
                                f"pinned {cfg.hf.base_hash[:16]}…: the base checkpoint changed")
            old = Path(cfg.run.out_dir) / "config.yaml"
            saved = (yaml.safe_load(old.read_text()) or {}).get("hf", {}).get("base_hash") if old.is_file() else None
            has_ckpt = (Path(cfg.run.out_dir) / "checkpoints").is_dir() and cfg.checkpoint.resume
            if has_ckpt:
                try:
                    find_checkpoint(Path(cfg.run.out_dir) / "checkpoints")
                except UserError:
                    has_ckpt = False
            if has_ckpt and saved and saved != digest and not cfg.run.overwrite:
                raise UserError(
                    f"hf.path: the base checkpoint {cfg.hf.path} changed since the checkpoints in {cfg.run.out_dir} "
                    f"were written (its files hash to {digest[:16]}…, the run's hf.base_hash is {saved[:16]}…); lean "
                    "checkpoints (checkpoint.trainable_only) hold only the trained parameters and need the same "
                    "frozen base: restore the original files, or start a new run (another run.out_dir)")
        except UserError as exc:
            err = str(exc)
    err, digest = _broadcast_object((err, digest))
    if err is not None:
        raise UserError(err)
    cfg.hf.base_hash = digest


def _broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (as is without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _bf16_compute(cfg: FinetuneConfig, device: torch.device) -> None:
    """Weights loaded in bf16 compute in bf16: ``train.precision`` fp32 becomes bf16 (autocast, or the
    engine's bf16 mode), which the fp32 trainable parameters of :func:`~longreach.hf.model.build_hf_model`
    need beside a bf16 frozen base."""
    from longreach.hf.model import resolve_dtype

    if resolve_dtype(cfg.hf.dtype, device) == torch.bfloat16 and cfg.train.precision == "fp32":
        log.info("hf.dtype %s loads bf16 weights: training with train.precision=bf16 (bf16 compute, fp32 "
                 "master weights%s)", cfg.hf.dtype, "" if cfg.hf.pure_bf16 else " and optimizer state")
        cfg.train.precision = "bf16"


def _gather_full_parameters(model: torch.nn.Module) -> None:
    """Full weights on every rank before export (FSDP2 shards, DeepSpeed ZeRO-3 partitions); collective."""
    from longreach.hf.export import gather_full_parameters

    gather_full_parameters(model)


@torch.no_grad()
def probe_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits ``[B, S, V]`` of a fine-tuned :class:`~longreach.hf.model.HFCausalLM`.

    The tokens are sharded exactly as in training (the trainer's :func:`~longreach.trainer.prepare_batch`)
    and the logits gathered from the context-parallel shards; the model's mode decides the pattern.
    """
    from longreach.attention import ContextParallelAttention
    from longreach.hf.patch import shift_labels
    from longreach.parallel import unshard_sequence
    from longreach.trainer import Batch, prepare_batch

    inner = model.inner_attention
    cp = isinstance(inner, ContextParallelAttention)
    layout, group = (inner.layout, inner.group) if cp else ("contiguous", None)
    x, pos, _, ctx = prepare_batch(Batch(input_ids=ids, labels=shift_labels(ids)), layout=layout, group=group,
                                   step=0, device=ids.device)
    logits = model(x, pos, ctx) @ model.output_weight().t()  # [B, S_local, V]
    if cp:
        logits = unshard_sequence(logits.contiguous(), layout=layout, group=group, dim=1)
    return logits.cpu()


def finetune_main(argv: list[str] | None = None) -> int:
    """``longreach finetune CONFIG [--section.field=value …]``."""
    p = argparse.ArgumentParser(prog="longreach finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML recipe (a file or a packaged name such as longlora_tiny_cpu)")
    p.add_argument("overrides", nargs="*", help="--section.field=value overrides")
    args, extra = p.parse_known_args(argv)
    try:
        from longreach.configio import load_config

        cfg = load_config(FinetuneConfig, args.config, list(args.overrides) + extra)
        finetune(cfg)
    except UserError as e:
        print(f"longreach: error: {e}", file=sys.stderr)
        return 2
    return 0


main = finetune_main
