"""The training loop: ``train(cfg: JobConfig) -> summary``.

Runs single-process or under ``torchrun`` (env ``RANK``/``WORLD_SIZE``: gloo on CPU, nccl on CUDA), or
inside an already initialised process group (tests). Per optimizer step:

1. draw ``grad_accum`` global micro-batches for this data-parallel rank (labels already shifted on the
   global sequence by the data pipeline — HF's in-model shift is wrong across zigzag shards);
2. shard input ids, labels and position ids with the configured layout over the cp group, and pass the
   global positions of the local tokens to attention through :class:`AttentionContext`;
3. all-reduce the count of non-ignored labels of the whole step over dp × cp; each micro-batch's loss is
   its local token-loss *sum* divided by that global count, times the dp × cp group size, and the
   engine (:mod:`longreach.engines`) averages gradients over that group, so gradients equal the
   single-rank gradient of the global mean loss;
4. agree on all ranks (one all-reduced flag, :class:`~longreach.faults.FaultPolicy`) whether the loss is
   finite; if not, skip the optimizer step (gradients discarded, data position and LR schedule still
   advance, the record says ``"skipped": true``) or stop the run, per ``faults.on_nonfinite``;
5. clip, step AdamW and the LR schedule; log one line (rank 0 through logging), one ``metrics.jsonl``
   record, and checkpoint every ``run.save_every`` steps and at the end.

Fault injection (``LONGREACH_FAULT_INJECT`` / ``faults.inject``, see :mod:`longreach.faults`) fires
``kill`` and ``hang`` at the start of a step, ``nan`` in the policy check and ``kill_in_save`` inside the
checkpoint save; step numbers there count from 1, like ``metrics.jsonl``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from longreach import data as D
from longreach.attention import AttentionContext
from longreach.checkpoint import CheckpointManager, config_diff
from longreach.configio import config_hash, save_resolved, to_dict
from longreach.data.cp_batch import shard_batch
from longreach.engines import as_engine_config, build_engine
from longreach.engines.native import DDPEngine
from longreach.errors import ConfigError, UserError
from longreach.faults import (CollectiveTimeoutError, CollectiveWatchdog, FaultConfig, FaultPolicy, RunFolderLock,
                              init_distributed, maybe_inject)
from longreach.loss import global_token_count
from longreach.metrics import MetricsWriter, Throughput, memory_mb
from longreach.mixtures.expert_parallel import expert_shards
from longreach.model_setup import cp_group, dp_cp_group, parallelize
from longreach.models import build_model as build_registered
from longreach.optim import build_optimizer, build_scheduler
from longreach.parallel.comm import all_reduce
from longreach.parallel.config import check_divisible
from longreach.sources import init_weights

log = logging.getLogger("longreach.trainer")

IGNORE_INDEX = -100

__all__ = ["Batch", "StepResult", "build_mesh", "check_config", "forward_backward", "prepare_batch", "setup_distributed", "train",
           "train_step"]

# settings that may change between runs in the same folder without making it "a different run"
ModelBuilder = Callable[[Any, torch.device], nn.Module]
"""``build_model(cfg, device) -> model`` (see :func:`train`)."""
DataBuilder = Callable[..., Any]
"""``build_data(cfg, *, dp_rank, dp_size) -> loader`` (see :func:`train`)."""

_CONTINUABLE = ("run.steps", "run.log_every", "run.save_every", "run.overwrite", "checkpoint.", "engine.",
                "parallel.", "attention.backend", "data.cache_dir", "faults.",
                "run.out_dir", "run.name")  # a moved, copied or renamed run folder is a continuation


# ---------------------------------------------------------------------------------------------- setup
def setup_distributed(*, timeout_s: float = 600.0) -> tuple[int, int, torch.device, bool]:
    """Join the process group torchrun describes (or the one already initialised).

    The group is created by :func:`longreach.faults.init_distributed`, which is safe across torchrun
    ``--max-restarts`` restarts (the plain ``env://`` init can reach the dead attempt's ranks).

    Args:
        timeout_s: the process group's collective timeout (``faults.collective_timeout_s``).

    Returns:
        ``(rank, world_size, device, owned)``; ``owned`` is True when this call created the group.
    """
    owned = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_distributed(backend, timeout_s=timeout_s)
        owned = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device, owned


def _setup_logging(rank: int) -> None:
    """Rank 0 logs INFO; other ranks only warnings (the one place ranks are filtered)."""
    root = logging.getLogger("longreach")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not root.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(h)


def build_mesh(parallel_cfg: Any, world_size: int, device: torch.device) -> tuple[Any, int, int]:
    """The job's DeviceMesh (:class:`~longreach.parallel.mesh.ParallelDims`, which validates the degrees)
    and this rank's data-parallel coordinates.

    Returns:
        ``(mesh or None (single process), dp_rank, dp_size)``.

    Raises:
        ConfigError: parallel.dp × parallel.cp does not match the world size.
    """
    try:
        dims = parallel_cfg.dims(world_size)  # the one validator of the degrees
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if world_size == 1 and not dist.is_initialized():
        return None, 0, 1
    mesh = dims.build_mesh(device.type)
    return mesh, mesh["dp"].get_local_rank(), dims.dp


def check_config(cfg: Any, world_size: int) -> None:
    """Every check that needs no data: raise one UserError naming the setting, before any work."""
    par, tr = cfg.parallel, cfg.train
    cp = par.cp
    try:
        par.dims(world_size)
        check_divisible(tr.seq_len, layout=par.layout, cp=cp, setting="train.seq_len")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    moe = getattr(getattr(cfg, "model", None), "moe", None)
    if moe is not None and moe.expert_parallel and cp > 1 and moe.experts % cp != 0:
        raise UserError(f"model.moe.experts={moe.experts} does not divide by parallel.cp={cp}, "
                        "which model.moe.expert_parallel splits the experts over")


# ---------------------------------------------------------------------------------------------- batches
@dataclasses.dataclass
class Batch:
    """One global micro-batch for this data-parallel rank (the whole sequence, before cp sharding).

    Attributes:
        input_ids: ``[B, S]`` token ids.
        labels: ``[B, S]`` next-token targets shifted on the global sequence (−100 = ignored).
        position_ids: ``[B, S]`` RoPE positions (per-document for packed documents); None = 0..S-1.
        cu_seqlens: document offsets: ``[n+1]`` shared by all rows, a tuple of one per row, or None.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | tuple[torch.Tensor, ...] | None = None


def _as_batch(raw: Any) -> Batch:
    if isinstance(raw, Batch):
        return raw
    get = raw.get if isinstance(raw, dict) else (lambda k, d=None: getattr(raw, k, d))
    cu = get("cu_seqlens", None)
    if isinstance(cu, list):
        cu = tuple(torch.as_tensor(c) for c in cu)
    elif isinstance(cu, torch.Tensor) and cu.dim() == 2:
        cu = tuple(cu.unbind(0))
    return Batch(input_ids=get("input_ids"), labels=get("labels"), position_ids=get("position_ids", None),
                 cu_seqlens=cu)


def prepare_batch(batch: Batch, *, layout: str, group: dist.ProcessGroup | None, step: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext]:
    """This cp rank's share of a global batch, and the attention context describing it.

    The sharding itself is :func:`longreach.data.shard_batch` (the one implementation); this adds the
    default position ids, the attention context and the move to ``device``. ``group`` None means no
    context parallelism: the whole sequence stays on this rank (it is never taken as WORLD).

    Returns:
        ``(input_ids [B, S/P], position_ids [B, S/P], labels [B, S/P], ctx)`` on ``device``.
    """
    b, s = batch.input_ids.shape
    if batch.labels.shape != (b, s):
        raise ValueError(f"labels {tuple(batch.labels.shape)} do not match input_ids {(b, s)}")
    pos_ids = batch.position_ids if batch.position_ids is not None else torch.arange(s).expand(b, s)
    part = shard_batch({"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": pos_ids}, layout,
                       group, context_parallel=group is not None)  # [B, S/P] each, positions [S/P]
    cu = batch.cu_seqlens
    if isinstance(cu, tuple) and all(torch.equal(c, cu[0]) for c in cu):
        cu = cu[0]
    ctx = AttentionContext(step=step, seq_len=s, positions=part["positions"].to(device), cu_seqlens=cu,
                           training=True)
    return part["input_ids"].to(device), part["position_ids"].to(device), part["labels"].to(device), ctx


@dataclasses.dataclass
class StepResult:
    loss: float
    """Global mean token loss of the step (plus auxiliary losses)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Non-ignored label tokens of the step over all ranks."""
    skipped: bool = False
    """The loss was non-finite on some rank and the optimizer step was skipped (``grad_norm`` is NaN)."""


def forward_backward(model: nn.Module, micro_batches: Iterable[Any], *, cfg: Any, mesh: Any, step: int,
                     device: torch.device, engine: Any = None) -> tuple[float, float, int]:
    """Accumulate the gradients of one step's micro-batches (collective over dp × cp).

    After it, every rank's ``p.grad`` is the gradient of the global mean token loss (plus the averaged
    auxiliary losses) over all micro-batches of all dp ranks — the single-rank gradient of that batch
    (split experts included: :meth:`~longreach.engines.Engine.sync_gradients`). The ``engine``
    (``longreach.engines``: DDP, FSDP2, DeepSpeed, accelerate) *averages* gradients over the dp × cp
    group, so the backward loss is multiplied by the group size. Without an engine the model's own
    backward runs and gradients stay this rank's (single-process references, measurements).

    Returns:
        ``(loss, aux_loss, n_tokens)``: global mean token loss, summed auxiliary term, global label count.
    """
    loss, aux, n_global, _ = _forward_backward(model, micro_batches, cfg=cfg, mesh=mesh, step=step, device=device,
                                               engine=engine)
    return loss, aux, n_global


def _forward_backward(model: nn.Module, micro_batches: Iterable[Any], *, cfg: Any, mesh: Any, step: int,
                      device: torch.device, engine: Any = None,
                      policy: FaultPolicy | None = None) -> tuple[float, float, int, bool]:
    """:func:`forward_backward`, plus the NaN/inf policy check (when ``policy`` is given).

    The check runs once per step, after the last micro-batch's forward and before its backward (a
    DeepSpeed engine steps inside its backward): every rank learns at once whether any rank's loss is
    non-finite. On a skip the gradients are discarded — DDP/FSDP still run that backward, so their
    gradient reduction completes normally; DeepSpeed skips it.

    Returns:
        ``(loss, aux_loss, n_tokens, apply)``; ``apply`` False: the step must be skipped (grads are zeroed).
    """
    tr, par = cfg.train, cfg.parallel
    group, replicas = cp_group(mesh), dp_cp_group(mesh)
    n_replicas = dist.get_world_size(replicas) if replicas is not None else 1
    prepared = [prepare_batch(_as_batch(b), layout=par.layout, group=group, step=step, device=device)
                for b in micro_batches]
    local_count = sum(int((lab != IGNORE_INDEX).sum()) for _, _, lab, _ in prepared)
    n_global = int(global_token_count(local_count, replicas)) if replicas is not None else local_count
    denom = max(n_global, 1)
    if engine is None:  # one process: the model and its own backward
        engine = DDPEngine(as_engine_config("native").with_precision(tr.precision), model, model, None, replicas=1)
    module = engine.module
    loss_sum_total = torch.zeros((), dtype=torch.float64, device=device)
    aux_total = torch.zeros((), dtype=torch.float64, device=device)
    check_total = torch.zeros((), dtype=torch.float64, device=device)  # this rank's losses: NaN/inf propagate
    apply = True
    for i, (ids, pos, labels, ctx) in enumerate(prepared):
        last = i == len(prepared) - 1
        with (engine.no_sync() if not last else contextlib.nullcontext()):
            with engine.forward_context():
                loss_sum, _ = model(ids, pos, ctx, labels=labels, loss_chunk_size=tr.loss_chunk_size)
            loss = loss_sum / denom
            aux = module.aux_loss
            if aux is not None:
                # the per-rank auxiliary loss is averaged over micro-batches and replicas (the backward scale
                # below undoes the engine's average, so each replica's term counts 1 / n_replicas)
                aux = aux.float() / (len(prepared) * n_replicas)
                loss = loss + aux
                aux_total += aux.detach().double()
            check_total += loss.detach().double()
            if last and policy is not None:
                apply = policy.check(check_total, step + 1)  # collective; raises on "stop"
            if not apply and engine.kind == "deepspeed":
                pass  # its backward would step the optimizer with the bad gradients
            else:
                engine.backward(loss * engine.replicas)  # the engine averages over its replicas
        loss_sum_total += loss_sum.detach().double()
    if apply:
        engine.sync_gradients()  # split experts: complete over their dp replicas
    elif engine.optimizer is not None:
        engine.skip_step()
    else:
        model.zero_grad(set_to_none=True)
    totals = torch.stack([loss_sum_total, aux_total])
    if replicas is not None:
        all_reduce(totals, group=replicas)
    return float(totals[0] / denom), float(totals[1]), n_global, apply


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[Any], *,
               cfg: Any, mesh: Any, step: int, device: torch.device,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, engine: Any = None,
               policy: FaultPolicy | None = None) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation), collective over dp × cp.

    Args:
        model: the engine's model (:func:`longreach.model_setup.parallelize`, then the engine's wrapper).
        optimizer: its optimizer; ``scheduler`` is stepped after it when given.
        micro_batches: global micro-batches of this dp rank (``train.grad_accum`` of them): :class:`Batch`
            or dicts with the same keys.
        cfg: the JobConfig (train, parallel sections).
        mesh: the ("dp", "cp") mesh or None.
        step: the step index (reaches random masks through the context).
        device: where the model lives.
        engine: the ``longreach.engines.Engine`` owning backward/clip/step (None: one process, ``optimizer``).
        policy: the NaN/inf policy (:class:`~longreach.faults.FaultPolicy` over the dp × cp group; it sees
            step ``step + 1``, the metrics' numbering). None: no check.

    Returns:
        The step's :class:`StepResult`; ``skipped`` (grad_norm NaN) when the policy skipped it — the
        gradients are discarded and the optimizer not stepped, but the LR schedule advances.

    Raises:
        NonFiniteLossError: on every rank at once, when the policy stops the run.
    """
    loss, aux, n_global, apply = _forward_backward(model, micro_batches, cfg=cfg, mesh=mesh, step=step,
                                                   device=device, engine=engine, policy=policy)
    if not apply:
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()  # the step index advances, so does the schedule
        return StepResult(loss=loss + aux, grad_norm=math.nan, tokens=n_global, skipped=True)
    if engine is None:
        engine = DDPEngine(as_engine_config("native"), model, model, optimizer, replicas=1)
    grad_norm = engine.clip_grad_norm(cfg.train.grad_clip or None)
    engine.step()
    if scheduler is not None:
        scheduler.step()
    return StepResult(loss=loss + aux, grad_norm=grad_norm, tokens=n_global)


# ---------------------------------------------------------------------------------------------- run folder
def _broadcast_error(err: str | None) -> None:
    """Raise the same UserError on every rank when rank 0 found a problem (no rank left waiting)."""
    if dist.is_initialized():
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise UserError(err)


def _continuable(line: str) -> bool:
    key = line.split(":", 1)[0]
    return any(key == p or key.startswith(p) for p in _CONTINUABLE)


def prepare_run_dir(cfg: Any, rank: int, lock: RunFolderLock | None = None) -> tuple[Path, str]:
    """Create or reuse the run folder; write ``config.yaml`` and ``config_hash`` (rank 0).

    Rank 0 first takes ``lock`` (one job per run folder) and removes partial ``step-*.tmp`` checkpoints
    left by a crash. A folder holding a run with a different config (beyond settings a continued run
    may change, such as ``run.steps``, the parallel layout or the folder's own path) is refused unless
    ``run.overwrite``: then the old run is moved aside to ``<run_dir>.replaced-<time>`` (or deleted
    with ``run.overwrite=delete``), and a warning says which. Nothing is written before that decision.

    Returns:
        ``(run_dir, config_hash)``.
    """
    run_dir = Path(cfg.run.out_dir)
    chash = config_hash(cfg)
    err = None
    if rank == 0:
        try:
            if lock is not None:
                lock.acquire()
            for partial in (run_dir / "checkpoints").glob("step-*.tmp"):  # this job holds the folder
                log.info("removing the partial checkpoint %s left by an interrupted save", partial)
                shutil.rmtree(partial, ignore_errors=True)
            old_file, hash_file = run_dir / "config.yaml", run_dir / "config_hash"
            old_hash = hash_file.read_text().strip() if hash_file.is_file() else None
            if old_file.is_file() and old_hash != chash:
                import yaml

                old = yaml.safe_load(old_file.read_text()) or {}
                diff = [d for d in config_diff(old, to_dict(cfg)) if not _continuable(d)]
                if diff and not cfg.run.overwrite:
                    shown = "; ".join(diff[:5]) + (" …" if len(diff) > 5 else "")
                    raise UserError(f"run folder {run_dir} holds a run with a different config ({shown}); "
                                    "set run.overwrite=true to move it aside (run.overwrite=delete deletes it), "
                                    "or choose another run.name/run.out_dir")
                if diff:
                    _replace_run(run_dir, cfg.run.overwrite, "; ".join(diff[:5]), keep=lock.path.name if lock else None)
            run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, run_dir / "config.yaml")
            (run_dir / "config_hash").write_text(chash + "\n")
        except UserError as e:
            err = str(e)
        except OSError as e:
            err = f"run.out_dir: cannot write the run folder {run_dir}: {e}"
        if err is not None and lock is not None:
            lock.release()
    _broadcast_error(err)
    return run_dir, chash


def _replace_run(run_dir: Path, how: Any, why: str, *, keep: str | None) -> None:
    """``run.overwrite``: move the old run's files to ``<run_dir>.replaced-<time>`` ("delete": remove them)."""
    import time

    entries = [p for p in run_dir.iterdir() if p.name != keep]
    if how == "delete":
        log.warning("run.overwrite=delete: deleting the previous run in %s (%s)", run_dir, why)
        for p in entries:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    aside.mkdir()
    for p in entries:
        os.replace(p, aside / p.name)
    log.warning("run.overwrite: moved the previous run in %s (%s) aside to %s (run.overwrite=delete deletes "
                "instead)", run_dir, why, aside)


# ---------------------------------------------------------------------------------------------- data
def _build_data(cfg: Any, *, dp_rank: int, dp_size: int) -> tuple[Any, int]:
    """The data loader of this dp rank (foundation A's pipeline) and the tokenizer's vocabulary size."""
    tokenizer = D.load_or_train_tokenizer(cfg.data)
    loader = D.build_train_data(cfg.data, tokenizer, seq_len=cfg.train.seq_len,
                                micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                seed=cfg.run.seed)
    return loader, int(tokenizer.vocab_size)


class _TrainerState:
    """Checkpointed trainer counters (``state_dict``/``load_state_dict``)."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.step, self.tokens = int(sd["step"]), int(sd["tokens"])


# ---------------------------------------------------------------------------------------------- train
def train(cfg: Any, *, data: Any = None, build_model: ModelBuilder | None = None,
          build_data: DataBuilder | None = None) -> dict[str, Any]:
    """Train ``cfg`` (a :class:`~longreach.job.JobConfig`); collective over all ranks.

    Args:
        cfg: the job config. With ``build_model``, any config with the trainer's sections (``run``,
            ``train``, ``parallel``, ``attention``, ``checkpoint``, ``engine``; ``model`` and ``faults``
            optional — without ``faults``, :class:`~longreach.faults.FaultConfig`'s defaults), such as
            ``longreach.hf.config.FinetuneConfig``.
        data: optional data loader to use instead of the configured pipeline (tests): an iterator of
            :class:`Batch`-like dicts for this dp rank, optionally with ``state_dict``/``load_state_dict``
            (then it is checkpointed per rank and a resumed run continues where it stopped).
        build_model: the model seam: ``build_model(cfg, device) -> nn.Module`` builds the single-device
            model (called after seeding with ``run.seed``, before ``parallelize``) in place of
            ``longreach.models.build_model(cfg.model)``. The module must offer our models' interface:
            ``forward(input_ids, position_ids, ctx, labels=, loss_chunk_size=) -> (loss_sum, n_tokens)``,
            ``aux_loss``, and an ``inner_attention`` seam (``longreach.hf.model.HFCausalLM`` does).
        build_data: ``build_data(cfg, dp_rank=, dp_size=) -> loader`` in place of the configured pipeline
            (called once the mesh gives this rank's data-parallel coordinates).

    Returns:
        Summary: ``run_dir``, ``metrics`` (metrics.jsonl path), ``checkpoint`` (latest checkpoint path or
        None), ``first_loss``, ``last_loss``, ``tokens_per_s`` (mean over the steps of this process),
        ``steps`` (final step), ``config_hash``, ``local_params`` (parameters held by this rank) and
        ``expert_params`` (of which split experts: this rank's share, 0 without expert parallelism).
    """
    fcfg: FaultConfig = getattr(cfg, "faults", None) or FaultConfig()
    rank, world, device, owned = setup_distributed(timeout_s=fcfg.collective_timeout_s)
    _setup_logging(rank)
    lock = RunFolderLock(cfg.run.out_dir) if rank == 0 else None  # one job per run folder
    try:
        check_config(cfg, world)
        mesh, dp_rank, dp_size = build_mesh(cfg.parallel, world, device)
        vocab = None
        if data is None and build_data is not None:
            data = build_data(cfg, dp_rank=dp_rank, dp_size=dp_size)
        elif data is None:
            data, vocab = _build_data(cfg, dp_rank=dp_rank, dp_size=dp_size)
        if vocab is not None and vocab != cfg.model.vocab_size:
            log.info("model.vocab_size set to the tokenizer's %d (was %d)", vocab, cfg.model.vocab_size)
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
        run_dir, chash = prepare_run_dir(cfg, rank, lock)

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        if build_model is not None:
            model = build_model(cfg, device).to(device)
            arch = type(model).__name__
        else:
            model = build_registered(cfg.model).to(device)
            arch = cfg.model.arch
            if getattr(cfg.checkpoint, "init_from", None):  # weights only; a resume below overrides them
                log.info("initial weights from %s", init_weights(model, cfg.checkpoint.init_from).describe())
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tr = cfg.train
        # the model for one device → seams, expert parallelism, checkpointing → the engine's data parallelism
        model = parallelize(model, cfg, mesh)

        def make_optimizer(params: Any) -> torch.optim.Optimizer:
            return build_optimizer(params, lr=tr.lr, weight_decay=tr.weight_decay, betas=tr.betas)

        ecfg = as_engine_config(cfg.engine).with_precision(tr.precision)  # train.precision is the one knob
        engine = build_engine(ecfg, model, make_optimizer, group=dp_cp_group(mesh), mesh=mesh,
                              grad_accum=tr.grad_accum, micro_batch_size=tr.micro_batch_size,
                              grad_clip=tr.grad_clip or None)
        model, optimizer = engine.model, engine.optimizer  # the optimizer holds only this rank's experts
        shards = expert_shards(model)
        local_params = sum(p.numel() for p in model.parameters())
        expert_params = sum(p.numel() for p in shards.params) if shards is not None else 0
        scheduler = build_scheduler(optimizer, warmup_steps=tr.warmup_steps, total_steps=cfg.run.steps,
                                    schedule=tr.schedule, lr=tr.lr, min_lr=tr.min_lr)
        state = _TrainerState()
        policy = FaultPolicy(fcfg, group=dp_cp_group(mesh))  # NaN/inf: skip or stop, agreed on all ranks
        ckpt = CheckpointManager(cfg.checkpoint, run_dir, config_hash=chash, config=to_dict(cfg))
        ckpt_state: dict[str, Any] = {**engine.checkpoint_state(), "scheduler": scheduler, "trainer": state,
                                      "faults": policy}
        if hasattr(data, "state_dict") and hasattr(data, "load_state_dict"):
            ckpt_state["data_loader"] = data
        start = ckpt.load(ckpt_state)
        if start:
            log.info("resumed at step %d", start)
        state.step = start
        writer = MetricsWriter(run_dir / "metrics.jsonl", enabled=rank == 0, truncate_after=start if start else None)
        log.info("model: %s, %.2fM parameters (%.2fM trainable, %.2fM on this rank); world %d (dp %d × cp %d, "
                 "%s/%s); run folder %s", arch, n_params / 1e6, n_trainable / 1e6, local_params / 1e6, world, dp_size,
                 cfg.parallel.cp, cfg.parallel.strategy, cfg.parallel.layout, run_dir)
        summary = _loop(cfg, model, optimizer, scheduler, data, mesh, device, state, ckpt, ckpt_state, writer,
                        rank=rank, dp_size=dp_size, engine=engine, policy=policy, faults=fcfg)
        latest = ckpt.latest()
        if hasattr(ckpt, "close"):
            ckpt.close()
        engine.close()
        summary.update(run_dir=str(run_dir), metrics=str(run_dir / "metrics.jsonl"),
                       checkpoint=str(latest) if latest else None, config_hash=chash,
                       local_params=local_params, expert_params=expert_params, trainable_params=n_trainable)
        log.info("done: metrics %s, checkpoint %s", summary["metrics"], summary["checkpoint"])
        return summary
    finally:
        if lock is not None:
            lock.release()
        if owned:
            dist.destroy_process_group()


_PEER_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "connectfullmesh")


@contextlib.contextmanager
def _name_stalls(rank: int, step: int, timeout_s: float) -> Iterator[None]:
    """Turn the backend's words for a dead or stalled peer (gloo: "Timed out waiting …", "Connection closed
    by peer") into one :class:`CollectiveTimeoutError` naming this rank, the step and the operation."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).strip()
        if isinstance(e, CollectiveTimeoutError) or not any(k in text.lower() for k in _PEER_FAILURE):
            raise
        first = text.splitlines()[0] if text else type(e).__name__
        first = first.split("] ", 1)[1] if first.startswith("[") and "] " in first else first  # gloo's source path
        first = first[:160]
        raise CollectiveTimeoutError(
            f"rank {rank}: step {step}: a collective in the train step (forward/backward/optimizer) failed after "
            f"waiting up to faults.collective_timeout_s={timeout_s:g}s: {first}; another rank is probably dead "
            "or stuck") from None


def _loop(cfg: Any, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data: Any, mesh: Any,
          device: torch.device, state: _TrainerState, ckpt: Any, ckpt_state: dict[str, Any], writer: MetricsWriter,
          *, rank: int, dp_size: int, engine: Any = None, policy: FaultPolicy | None = None,
          faults: FaultConfig | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    faults = faults or FaultConfig()
    # The watchdog guards each step but the first of this process (compilation/autotuning may take
    # long there): a step stuck past collective_timeout_s is reported naming rank and step (with a stack
    # dump), and the process exits (code 124) another timeout later so torchrun restarts the job.
    # (at twice the timeout: the backend's own timeout, turned into one line by _name_stalls, comes first)
    watchdog = (CollectiveWatchdog(2 * faults.collective_timeout_s) if faults.watchdog and dist.is_initialized()
                else None)
    first = True

    tr, run = cfg.train, cfg.run
    it: Iterator = iter(data)
    timer = Throughput()
    losses: list[float] = []
    rates: list[float] = []
    bar = tqdm(total=run.steps, initial=state.step, disable=rank != 0, desc="train", dynamic_ncols=True,
               leave=False)
    saved_at = state.step if state.step else None
    try:
        while state.step < run.steps:
            n = state.step + 1  # the step's number in metrics.jsonl and in fault injection
            maybe_inject("kill", n, faults.inject)  # fault tests: SIGKILL this rank before step n
            try:
                micro = [next(it) for _ in range(tr.grad_accum)]
            except StopIteration:
                log.warning("data exhausted at step %d", state.step)
                break
            lr = optimizer.param_groups[0]["lr"]
            guard = (watchdog.guard(f"in train step {n} (forward/backward/optimizer)")
                     if watchdog is not None and not first else contextlib.nullcontext())
            with guard, _name_stalls(rank, n, faults.collective_timeout_s):
                maybe_inject("hang", n, faults.inject)  # fault tests: this rank stalls, the others wait
                res = train_step(model, optimizer, micro, cfg=cfg, mesh=mesh, step=state.step, device=device,
                                 scheduler=scheduler, engine=engine, policy=policy)
            first = False
            state.step += 1
            global_tokens = tr.seq_len * tr.micro_batch_size * tr.grad_accum * dp_size
            state.tokens += global_tokens
            rate = timer.tick(global_tokens)
            losses.append(res.loss)
            rates.append(rate)
            mem = memory_mb(device)
            writer.write({"step": state.step, "loss": res.loss, "tokens_per_s": rate, "lr": lr,
                          "grad_norm": res.grad_norm, "mem_mb": mem, "tokens": state.tokens,
                          "skipped": res.skipped})
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.4f}", refresh=False)
            if state.step % run.log_every == 0 or state.step == run.steps:
                log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f tokens/s %.0f mem %.0f MiB%s", state.step,
                         run.steps, res.loss, lr, res.grad_norm, rate, mem,
                         " (skipped: non-finite loss)" if res.skipped else "")
            if run.save_every and state.step % run.save_every == 0 and state.step < run.steps:
                ckpt.save(state.step, ckpt_state)
                saved_at = state.step
        if saved_at != state.step:
            ckpt.save(state.step, ckpt_state)
    finally:
        bar.close()
        if watchdog is not None:
            watchdog.close()
    steady = rates[1:] if len(rates) > 1 else rates  # the first step includes warm-up work
    return {"first_loss": losses[0] if losses else math.nan, "last_loss": losses[-1] if losses else math.nan,
            "tokens_per_s": sum(steady) / len(steady) if steady else 0.0, "steps": state.step}
