"""Spawned-rank workers for tests/test_expert_engines.py: the MoE job with its experts split over cp=2 under
each engine, against the same job with every expert replicated under native DDP."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from longreach.metrics import read_metrics
from longreach.models import build_model
from longreach.sources import read_state_dict, resolve_source
from longreach.trainer import train
from workers.trainer import MOE_OPTIONS, SyntheticBatches, _full_state_from_checkpoint, moe_job
from workers.trainer import _close as _rel_close

COMMON = {"run.steps": 4, "run.save_every": 2, "checkpoint.keep_last": 0, "train.seq_len": 32,
          "train.micro_batch_size": 2, "train.lr": 1e-2, "train.warmup_steps": 1, "parallel.cp": 2,
          "parallel.layout": "zigzag", "attention.backend": "cpu"}

# bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per value, summed over the layers' matmuls):
# a bf16 run follows the fp32 one to a few 1e-3 in loss; 2e-2 leaves room without hiding a wrong expert
# gradient (a missing dp reduction or a dropped 1/scale moves the loss by > 1e-1 within 4 steps at lr 1e-2).
BF16_TOL = 2e-2

ENGINE_RUNS: dict[str, tuple[dict[str, Any], dict[str, Any] | None, float]] = {
    # name: (split run's overrides, the step-2 checkpoint resumed under these overrides or None, tolerance
    # against the replicated DDP run, or against REFERENCES[name] where given)
    "fsdp2": ({"engine.options": {"fsdp": True}}, {}, 1e-5),  # resumed under DDP (another engine's layout)
    "deepspeed_zero1": ({"engine.kind": "deepspeed", "engine.options": {"zero_stage": 1}},
                        {"engine.kind": "deepspeed", "engine.options": {"zero_stage": 1}}, 1e-5),
    "deepspeed_zero3": ({"engine.kind": "deepspeed", "engine.options": {"zero_stage": 3}},
                        {"engine.kind": "deepspeed", "engine.options": {"zero_stage": 3}}, 1e-5),
    "deepspeed_zero0": ({"engine.kind": "deepspeed", "engine.options": {"zero_stage": 0}}, None, 1e-5),
    "accelerate": ({"engine.kind": "accelerate"}, {}, 1e-5),  # resumed under native DDP
    "deepspeed_zero0_bf16": ({"engine.kind": "deepspeed", "engine.options": {"zero_stage": 0},
                              "train.precision": "bf16"}, None, BF16_TOL),
    "deepspeed_zero2_bf16": ({"engine.kind": "deepspeed", "engine.options": {"zero_stage": 2},
                              "train.precision": "bf16"},
                             {"engine.kind": "deepspeed", "engine.options": {"zero_stage": 2},
                              "train.precision": "bf16"}, BF16_TOL),
    "deepspeed_zero3_bf16": ({"engine.kind": "deepspeed", "engine.options": {"zero_stage": 3},
                              "train.precision": "bf16"}, None, BF16_TOL),
}
# DeepSpeed's ZeRO-0 bf16 optimizer (FP16_UnfusedOptimizer: bf16 gradients all-reduced, masters started from
# the bf16 weights) moves away from fp32 by more than bf16 rounding (grad norm 1.30 vs 1.68 at step 3 with
# every expert replicated): its split-expert run is compared with DeepSpeed's own run of experts replicated.
REFERENCES = {"deepspeed_zero0_bf16": ENGINE_RUNS["deepspeed_zero0_bf16"][0]}


def _run(out_dir: str, name: str, ep: bool, over: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    # the engine's keys first: each section is replaced in turn and checked against the others (fp16)
    cfg = moe_job(moe={"expert_parallel": ep}, **{**over, "run.out_dir": f"{out_dir}/{name}", **COMMON, **over})
    data = SyntheticBatches(vocab=cfg.model.vocab_size, seq_len=cfg.train.seq_len, batch=2, seed=0)
    return cfg, train(cfg, data=data)


def _compare(label: str, got: list[dict], want: list[dict], tol: float, failures: list[str]) -> None:
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "grad_norm"):
            if not abs(a[key] - b[key]) <= tol * abs(a[key]):
                failures.append(f"{label} step {a['step']} {key}: {b[key]!r} != replicated {a[key]!r} (tol {tol:g})")


def engine_expert_parallel_checks(rank: int, world_size: int, out_dir: str, engines: list[str]) -> list[str]:
    """Experts split over cp=2 under each of ``engines`` (:data:`ENGINE_RUNS`) against the MoE model trained
    under plain DDP with every expert on every rank, 4 steps each.

    Checks per engine: losses and grad norms per step equal the replicated run's (1e-5; bf16 runs against
    the fp32 run within :data:`BF16_TOL`); this rank holds half the expert parameters; the checkpoint's
    weights, experts gathered by DCP on one process (another layout and world size), equal the replicated
    run's final weights (fp32 runs) and are all fp32 (:func:`_check_checkpoint`); and the step-2 checkpoint
    resumed under the given engine gives the same steps 3 and 4 as the straight run (1e-5: optimizer
    moments and masters saved).
    """
    failures: list[str] = []
    cfg_rep, rep = _run(out_dir, "ddp_replicated", False, {})
    want = read_metrics(rep["metrics"])
    full_rep = _full_state_from_checkpoint(rep["checkpoint"], cfg_rep) if rank == 0 else None
    m = cfg_rep.model
    all_experts = m.n_layers * 3 * MOE_OPTIONS["experts"] * m.dim * m.ffn_hidden
    finals: dict[str, str] = {}
    for engine in engines:
        split_over, resume_over, tol = ENGINE_RUNS[engine]
        try:
            _, split = _run(out_dir, f"{engine}_split", True, split_over)
        except Exception as e:  # noqa: BLE001 - reported per engine; the other engines still run
            failures.append(f"{engine}: {type(e).__name__}: {e}")
            continue
        ref = want
        if engine in REFERENCES:
            ref = read_metrics(_run(out_dir, f"{engine}_replicated", False, REFERENCES[engine])[1]["metrics"])
        _compare(f"{engine} split experts", read_metrics(split["metrics"]), ref, tol, failures)
        if split["expert_params"] != all_experts // 2:
            failures.append(f"{engine}: rank {rank} holds {split['expert_params']} expert parameters, want "
                            f"{all_experts // 2}")
        straight = read_metrics(split["metrics"])
        finals[engine] = split["checkpoint"]
        if rank == 0:
            _check_checkpoint(engine, split["checkpoint"], full_rep if tol <= 1e-5 else None, failures)
            if resume_over is not None:
                shutil.rmtree(sorted(Path(out_dir, f"{engine}_split", "checkpoints").glob("step-*"))[-1])
        if resume_over is None:
            continue
        dist.barrier()
        _, again = _run(out_dir, f"{engine}_split", True, resume_over)  # the step-2 checkpoint resumed
        if not abs(again["first_loss"] - straight[2]["loss"]) <= 1e-5 * abs(straight[2]["loss"]):
            failures.append(f"{engine} resume did not start at step 3: first loss {again['first_loss']!r}, "
                            f"step 3 loss {straight[2]['loss']!r}")
        _compare(f"{engine} step-2 checkpoint resumed", read_metrics(split["metrics"]), straight, 1e-5, failures)
    if "deepspeed_zero2_bf16" in engines:
        _bf16_updates_kept(rank, out_dir, failures)
    if "deepspeed_zero3" in finals:
        _across_engines(out_dir, rep["checkpoint"], finals["deepspeed_zero3"], failures)
    return failures


def _across_engines(out_dir: str, native_ckpt: str, zero3_ckpt: str, failures: list[str]) -> None:
    """Weights across engines (``checkpoint.init_from``): DeepSpeed ZeRO-3 with split experts starts from the
    replicated DDP run's final checkpoint, native DDP with split experts from the ZeRO-3 run's (its experts
    gathered from both ranks' DCP shards). The two checkpoints hold the same weights (checked to 1e-4 above),
    so both runs' first losses agree (1e-4), and differ from a fresh model's (the weights were loaded)."""
    over = {"run.steps": 1, "run.save_every": 0}
    zero3 = {"engine.kind": "deepspeed", "engine.options": {"zero_stage": 3}}
    _, a = _run(out_dir, "zero3_from_native", True, {**zero3, **over, "checkpoint.init_from": native_ckpt})
    _, b = _run(out_dir, "native_from_zero3", True, {**over, "checkpoint.init_from": zero3_ckpt})
    _, fresh = _run(out_dir, "native_fresh", True, over)
    if not abs(a["first_loss"] - b["first_loss"]) <= 1e-4 * abs(b["first_loss"]):
        failures.append(f"init_from across engines: ZeRO-3 from the DDP checkpoint {a['first_loss']!r} != DDP from "
                        f"the ZeRO-3 checkpoint {b['first_loss']!r}")
    if abs(b["first_loss"] - fresh["first_loss"]) <= 1e-3 * abs(fresh["first_loss"]):
        failures.append(f"init_from across engines: the loaded weights give the fresh model's loss {fresh['first_loss']!r}")


def _bf16_updates_kept(rank: int, out_dir: str, failures: list[str]) -> None:
    """DeepSpeed bf16 with split experts at lr 1e-5: Adam moves each weight by ~1e-5 a step, below half the
    bf16 spacing of a weight of size 0.02 (6e-5). The fp32 expert weights must still move (most of them to a
    value a bf16 weight could not hold apart from its start), and the checkpoint's dense weights must be
    DeepSpeed's fp32 masters (most not representable in bf16), not the module's bf16 copies."""
    over = {"engine.kind": "deepspeed", "engine.options": {"zero_stage": 2}, "train.precision": "bf16",
            "train.lr": 1e-5, "train.min_lr": 0.0, "run.steps": 2, "run.save_every": 0}
    cfg, summary = _run(out_dir, "deepspeed_zero2_bf16_small_lr", True, over)
    if rank != 0:
        return
    torch.manual_seed(cfg.run.seed)  # the trainer's initial weights
    init = build_model(cfg.model).state_dict()
    final = _full_state_from_checkpoint(summary["checkpoint"], cfg)
    for k, v in final.items():
        bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
        if ".experts." in k:
            start = init[k]  # a bf16 weight would stay at bf16(start): the update is below its resolution
            kept = ((v != start) & (v != bf16(start)) & (bf16(v) == bf16(start))).float().mean().item()
            if kept < 0.5:
                failures.append(f"bf16 {k}: only {kept:.0%} of the expert weights moved by less than bf16 resolves")
        elif v.dim() > 1:
            fp32 = (v != bf16(v)).float().mean().item()
            if fp32 < 0.5:
                failures.append(f"bf16 {k}: the checkpoint holds bf16 values ({fp32:.0%} need fp32), not the masters")


def _check_checkpoint(engine: str, ckpt: str, full_rep: dict[str, Any] | None, failures: list[str]) -> None:
    """The checkpoint read by one process as ``longreach export`` reads it (``longreach.sources``; DCP gathers
    the split experts): every weight fp32 (bf16 runs:
    DeepSpeed's fp32 masters and the fp32 experts) and, when ``full_rep`` is given, equal to the replicated
    run's final weights (1e-4). Mixed-precision runs are not compared weight by weight: Adam's first steps
    move each weight by ±lr whatever the gradient's size, so a weight whose gradient is near zero lands on
    either side in bf16 and fp32 runs alike."""
    full_split = read_state_dict(resolve_source(ckpt))
    for k, v in (full_rep or {}).items():
        msg = _rel_close(k, full_split[k], v, 1e-4)
        if msg:
            failures.append(f"{engine} final weights: {msg}")
    saved = FileSystemReader(f"{ckpt}/model").read_metadata().state_dict_metadata
    low = sorted(k for k, md in saved.items() if k.startswith("model.") and md.properties.dtype != torch.float32)
    if low:
        failures.append(f"{engine}: checkpoint weights not fp32: {low[:3]}")


def engines_and_expert_bytes(rank: int, world_size: int, out_dir: str, engines: list[str],
                             bench_engines: list[str]) -> dict[str, Any]:
    """One spawn (a gloo group costs seconds): :func:`engine_expert_parallel_checks` over ``engines``; the
    per-rank expert bytes ``longreach bench mixtures --expert-bytes`` counts under ``bench_engines`` (4
    experts of dim 16, hidden 24); and the ConfigError of a configuration that cannot split experts
    (DeepSpeed ZeRO-0 with fp16), or None if none was raised."""
    from longreach.bench.mixtures import expert_bytes_worker
    from longreach.errors import ConfigError
    from longreach.model_setup import parallelize
    from longreach.trainer import build_mesh

    failures = engine_expert_parallel_checks(rank, world_size, out_dir, engines)
    counts = expert_bytes_worker(rank, world_size, bench_engines, 4, 16, 24)
    try:  # the job config refuses it when it loads (before any run folder), parallelize as a second guard
        cfg = moe_job(moe={"expert_parallel": True}, **{"engine.kind": "deepspeed", "engine.options": {"zero_stage": 0},
                                                         "train.precision": "fp16", **COMMON})
        mesh, _, _ = build_mesh(cfg.parallel, world_size, torch.device("cpu"))
        parallelize(build_model(cfg.model), cfg, mesh)
        error = None
    except ConfigError as e:
        error = str(e)
    return {"failures": failures, "expert_bytes": counts, "zero0_fp16_error": error}
