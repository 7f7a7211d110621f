"""The driver of ``longreach finetune``: extend an HF checkpoint's context through the shared trainer.

A fine-tuning job runs through :func:`longreach.trainer.train`: the same loop, engines (DDP, FSDP2,
DeepSpeed, accelerate), gradient accumulation and clipping, LR schedule, logging, ``metrics.jsonl``,
run-folder protection, and :class:`~longreach.checkpoint.CheckpointManager` checkpoints with automatic
resume — rerun the same command after an interruption and it continues from the latest checkpoint in
``run.out_dir``. What is specific to HF fine-tuning enters through the trainer's two seams:

* the model (:func:`longreach.hf.model.build_hf_model`): load ``hf.path``, apply ``recipe`` (RoPE
  scaling written into the config; LoRA via peft plus trainable embeddings and norms, or full),
  patch attention through transformers' registry; ``parallelize`` then installs the same local /
  context-parallel inner attention it installs in our own models, from ``attention`` and ``parallel``,
  and applies the same memory steps to the HF decoder blocks: ``train.sequence_tile`` (MLP and norms over
  token tiles), ``train.activation_checkpointing`` and ``train.checkpoint_offload``
  (:class:`~longreach.hf.config.FTTrain`);
* the data (:class:`~longreach.hf.data.TokenWindows`): the corpus tokenized with the checkpoint's
  tokenizer, cut into ``recipe.target_len`` windows, labels shifted on the global sequence; its position
  is checkpointed.

After the last step rank 0 merges LoRA and exports a plain HF checkpoint with the tokenizer files to
``<run.out_dir>/export``. What a checkpoint holds: :mod:`longreach.hf.config`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from longreach.attention import ContextParallelAttention
from longreach.checkpoint import find_checkpoint
from longreach.errors import ConfigError, UserError
from longreach.hf.config import FinetuneConfig
from longreach.hf.data import TokenWindows, tokenize_corpus
from longreach.hf.export import checkpoint_dtype, export_hf, gather_full_parameters, run_on_rank0
from longreach.hf.model import build_hf_model, resolve_dtype
from longreach.hf.patch import shift_labels
from longreach.hf.recipes import trainable_summary
from longreach.hf.rope import rope_parameters_for
from longreach.metrics import read_metrics
from longreach.parallel import unshard_sequence
from longreach.trainer import Batch, prepare_batch, setup_distributed, train

__all__ = ["base_files_hash", "finetune", "load_tokenizer", "probe_logits"]

log = logging.getLogger(__name__)


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
    if not cfg.hf.path:
        raise ConfigError("hf.path: set the HF checkpoint folder to fine-tune")
    if not (Path(cfg.hf.path) / "config.json").is_file():
        raise UserError(f"hf.path: {cfg.hf.path} is not a HuggingFace checkpoint folder (no config.json)")
    from transformers import AutoConfig  # transformers is imported only by a job that runs

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
        gather_full_parameters(model)  # full weights on every rank before export; collective
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
    if resolve_dtype(cfg.hf.dtype, device) == torch.bfloat16 and cfg.train.precision == "fp32":
        log.info("hf.dtype %s loads bf16 weights: training with train.precision=bf16 (bf16 compute, fp32 "
                 "master weights%s)", cfg.hf.dtype, "" if cfg.hf.pure_bf16 else " and optimizer state")
        cfg.train.precision = "bf16"


@torch.no_grad()
def probe_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits ``[B, S, V]`` of a fine-tuned :class:`~longreach.hf.model.HFCausalLM`.

    The tokens are sharded exactly as in training (the trainer's :func:`~longreach.trainer.prepare_batch`)
    and the logits gathered from the context-parallel shards; the model's mode decides the pattern.
    """
    inner = model.inner_attention
    cp = isinstance(inner, ContextParallelAttention)
    layout, group = (inner.layout, inner.group) if cp else ("contiguous", None)
    x, pos, _, ctx = prepare_batch(Batch(input_ids=ids, labels=shift_labels(ids)), layout=layout, group=group,
                                   step=0, device=ids.device)
    logits = model(x, pos, ctx) @ model.output_weight().t()  # [B, S_local, V]
    if cp:
        logits = unshard_sequence(logits.contiguous(), layout=layout, group=group, dim=1)
    return logits.cpu()
