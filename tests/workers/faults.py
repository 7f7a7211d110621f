"""Workers for the checkpoint / fault / resume tests: a small, fully deterministic training loop.

It exercises exactly the pieces the real trainer uses — :class:`~longreach.checkpoint.CheckpointManager`
(model, optimizer, LR scheduler, data position, trainer dict, RNG), :class:`~longreach.faults.FaultPolicy`,
fault injection and an engine from :func:`~longreach.engines.build_engine` — on a tiny MLP with dropout
(so the RNG state matters), and writes ``metrics.jsonl`` like the trainer. Runs under ``run_ranks``
(:func:`resume_worker`, :func:`matrix_worker`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longreach.checkpoint import CheckpointConfig, CheckpointManager
from longreach.engines import as_engine_config, build_engine
from longreach.errors import UserError
from longreach.faults import (CollectiveTimeoutError, FaultConfig, FaultPolicy, NonFiniteLossError, check_finite,
                              maybe_inject, timed_collective)
from workers.engines import ResidualMLP

GLOBAL_BATCH = 8


class DropNet(ResidualMLP):
    """A residual MLP with dropout in every block (so the checkpointed RNG state matters)."""

    def __init__(self, dim: int = 16, n_layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__(dim, (nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))
                               for _ in range(n_layers)))


class StepLoader:
    """Deterministic data: the global batch of step i (independent of world size), this rank's slice."""
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.position = rank, world, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(7919 * (self.position + 1))
        x = torch.randn(GLOBAL_BATCH, 8, generator=g)  # [G, 8]
        y = torch.cos(x[:, :4].sum(-1)) + 0.1 * x[:, 4]  # [G]
        self.position += 1
        per = GLOBAL_BATCH // self.world
        return x[self.rank * per:(self.rank + 1) * per], y[self.rank * per:(self.rank + 1) * per]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.position = int(sd["position"])


def train_loop(run_dir: str | Path, *, steps: int, save_every: int, engine: dict[str, Any] | None = None,
               dropout: float = 0.1, keep_last: int = 3, async_save: bool = False, config_hash: str = "tiny",
               nan_steps: tuple[int, ...] = (), on_nonfinite: str = "skip",
               load_path: str | None = None) -> list[dict[str, Any]]:
    """Train and checkpoint; resume from the run folder's latest checkpoint first. Returns this run's records."""
    run_dir = Path(run_dir)
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(0)
    model = DropNet(dropout=dropout)
    eng = build_engine(as_engine_config(engine or {}), model,
                       lambda ps: torch.optim.AdamW(ps, lr=5e-3, weight_decay=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(eng.optimizer, lambda s: min(1.0, (s + 1) / 3))
    loader = StepLoader(rank, world)
    trainer: dict[str, Any] = {"step": 0, "seen": 0}
    inject = ";".join(f"nan@step={s}" for s in nan_steps) or None
    policy = FaultPolicy(FaultConfig(on_nonfinite=on_nonfinite, inject=inject))
    mgr = CheckpointManager(CheckpointConfig(keep_last=keep_last, async_save=async_save, load_path=load_path),
                            run_dir, config_hash=config_hash)
    state: dict[str, Any] = {**eng.checkpoint_state(), "scheduler": sched, "data_loader": loader,
                             "trainer": trainer, "faults": policy}
    start = mgr.load(state)
    metrics = run_dir / "metrics.jsonl"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if metrics.exists():  # drop records past the checkpoint we resumed from (they are redone)
            kept = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
        metrics.write_text("".join(ln + "\n" for ln in kept))
    records = []
    for step in range(start + 1, steps + 1):
        maybe_inject("kill", step)
        x, y = loader.next()
        with eng.forward_context():
            pred = eng.model(x)
        loss = ((pred.float() - y) ** 2).mean()
        ok = policy.check(loss, step)
        if ok:
            eng.backward(loss)
            eng.clip_grad_norm(1.0)
            eng.step()
            sched.step()
        else:
            eng.skip_step()
        t = loss.detach().clone().reshape(1)  # [1]
        if distributed:
            dist.all_reduce(t)
        rec = {"step": step, "loss": float(t) / world, "skipped": not ok, "world": world,
               "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)}
        trainer["step"] = step
        trainer["seen"] += GLOBAL_BATCH
        records.append(rec)
        if rank == 0:
            with metrics.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if save_every and step % save_every == 0:
            mgr.save(step, state)
    mgr.close()
    return records


def resume_worker(rank: int, world_size: int, run_dir: str, steps: int, save_every: int,
                  kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``run_ranks`` entry: :func:`train_loop` with ``kwargs``."""
    return train_loop(run_dir, steps=steps, save_every=save_every, **(kwargs or {}))


def errors_worker(rank: int, world_size: int, run_dir: str) -> list[str]:
    """Bad checkpoints on several ranks: every rank must raise the same UserError (no hang)."""
    out = []
    torch.manual_seed(0)
    model = DropNet(dim=24)  # different shape from the saved DropNet(dim=16)
    try:
        CheckpointManager(CheckpointConfig(), Path(run_dir), config_hash="tiny").load({"model": model})
        out.append("shape: no error")
    except UserError as e:
        out.append("shape: " + str(e))
    try:
        CheckpointManager(CheckpointConfig(), Path(run_dir), config_hash="other").load({"model": DropNet()})
        out.append("hash: no error")
    except UserError as e:
        out.append("hash: " + str(e))
    return out


def matrix_worker(rank: int, world_size: int, jobs: list[tuple[str, int, int, dict[str, Any]]],
                  errors_dir: str | None = None) -> dict[str, Any]:
    """Several :func:`train_loop` runs (``(run_dir, steps, save_every, kwargs)``) in one spawn, then
    optionally :func:`errors_worker` on ``errors_dir``; returns {run_dir: records, "errors": [...]}."""
    out: dict[str, Any] = {}
    for run_dir, steps, save_every, kwargs in jobs:
        out[run_dir] = train_loop(run_dir, steps=steps, save_every=save_every, **kwargs)
        dist.barrier()
    if errors_dir is not None:
        out["errors"] = errors_worker(rank, world_size, errors_dir)
    return out


def nan_worker(rank: int, world_size: int, run_dir: str) -> dict[str, Any]:
    """A NaN on rank 1 only: every rank must skip that step (skip policy) or stop (stop policy)."""
    out: dict[str, Any] = {}
    # check_finite agrees across ranks
    local = torch.tensor(float("nan")) if rank == 1 else torch.tensor(1.0)
    out["check_finite_mixed"] = check_finite(local, None)
    out["check_finite_ok"] = check_finite(torch.tensor(2.0), None)
    recs = train_loop(Path(run_dir) / "skip", steps=4, save_every=0, dropout=0.0)
    recs_nan = train_loop(Path(run_dir) / "skip_nan", steps=4, save_every=0, dropout=0.0,
                          nan_steps=() if rank == 0 else (2,))
    out["clean"] = recs
    out["nan"] = recs_nan
    policy = FaultPolicy(FaultConfig(on_nonfinite="stop"))
    try:
        policy.check(torch.tensor(float("inf")) if rank == 1 else torch.tensor(0.5), step=7)
        out["stop"] = "no error"
    except NonFiniteLossError as e:
        out["stop"] = str(e)
    return out


def timeout_worker(rank: int, world_size: int, timeout_s: float) -> str:
    """Rank 1 never joins an all-reduce: rank 0's must fail naming the rank and the operation."""
    if rank == 1:
        time.sleep(timeout_s * 3)
        return "rank 1 stayed away"
    t = torch.ones(1)
    try:
        timed_collective("all_reduce(loss)", dist.all_reduce, t, timeout_s=timeout_s)
        return "no error"
    except CollectiveTimeoutError as e:
        return str(e)


def faults_matrix_worker(rank: int, world_size: int, run_dir: str, ref_steps: int, save_every: int) -> dict[str, Any]:
    """One spawn for tests/test_faults.py: reference run, NaN policies, then the collective timeout (last:
    it leaves the group unusable)."""
    out = {"ref": train_loop(Path(run_dir) / "ref", steps=ref_steps, save_every=save_every)}
    out.update(nan_worker(rank, world_size, run_dir))
    dist.barrier()
    out["timeout"] = timeout_worker(rank, world_size, 1.0)
    return out
