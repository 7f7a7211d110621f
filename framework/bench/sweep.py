"""``longreach bench sweep FILE.yaml``: throughput scaling sweeps appended to ``results.jsonl``.

A sweep is the product of attention kernels (backends) × masks × context-parallel strategies ×
layouts × sequence lengths × world sizes, over one attention shape ``[B, S, H, D]`` (see
:class:`SweepConfig`; ``configs/bench_cpu_sweep.yaml`` runs here in a few minutes). Ranks are
launched per world size with ``longreach.testing.run_ranks`` (one spawn runs every point of that world
size); under ``torchrun`` the already-started world runs the points of its own size instead.

Per point, one JSON record (``kind: "sweep_point"``) with:

* ``time_fwd`` / ``time_fwd_bwd``: after ``warmup`` untimed iterations (at least one), ``repeats``
  timed ones, taken round-robin over the world size's points (a burst of foreign load on a shared
  machine then hits single repeats of many points, not every repeat of one); each repeat's time is the
  max over ranks (after a barrier); ``median``, ``min``, ``max``, ``iqr`` and ``spread`` = (max − min)/median;
* ``tokens_per_s`` (B·S / median forward+backward time) and ``tokens_per_s_fwd``;
* ``flops_fwd`` = 4·B·S²·H·D·density (density: share of pairs the mask allows) and
  ``flops_fwd_bwd`` = 3.5 × that (backward = 2.5 × forward, FlashAttention's count, see
  :mod:`longreach.planning.costmodel`); ``tflops_fwd``/``tflops_fwd_bwd`` achieved, and ``mfu`` against
  the device's peak (:func:`longreach.planning.hardware.peak_flops`; None on CPUs, whose peak is unknown);
* ``memory.peak_bytes`` per rank: CUDA ``max_memory_allocated`` growth over the pass on GPU; on CPU
  the peak of live tensor storage bytes allocated during one extra untimed forward+backward
  (``LiveTensorBytes`` in ``longreach.bench.sweep_ranks``); ``rss_peak_kb`` (process ru_maxrss) alongside;
* ``comm``: bytes sent per rank in one forward and one backward (``CommRecorder``) and calls per kind;
* ``balance``: attention score elements computed per rank (``WorkCounter``), max/mean;
* ``hardware`` (CPU model, cores, GPU name), ``software`` (python, torch, longreach, triton), ``config``.

Points that cannot run (heads not divisible by the Ulysses degree, a length the layout cannot split)
are recorded with ``status: "skipped"`` and the reason; a crashed world size marks its points
``status: "error"`` and the sweep goes on.

    longreach bench sweep configs/bench_cpu_sweep.yaml --out results.jsonl
    longreach bench sweep bench_cpu_sweep --sweep.seq_lens=[1024,2048]     # override any field
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longreach.bench.kernels import mask_density
from longreach.bench.sweep_ranks import build_point_mask, sweep_worker
from longreach.configio import load_config, to_dict
from longreach.errors import ConfigError, UserError
from longreach.parallel.config import LAYOUTS, STRATEGIES as CP_STRATEGIES
from longreach.planning.costmodel import ATTN_BWD_FACTOR, attention_flops, causal_density
from longreach.planning.hardware import hardware_info, peak_flops, software_versions
from longreach.testing import run_ranks

__all__ = ["SweepConfig", "SweepFile", "enumerate_points", "main", "run_sweep", "summarize_times"]

STRATEGIES = (*CP_STRATEGIES, "lasp2")
MASKS = ("causal", "full", "sliding_window", "sinks_window", "documents", "power", "s2_varlen", "s2_roll", "sf", "ssa")
DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(kw_only=True, slots=True)
class SweepConfig:
    name: str = "sweep"
    """Label stored in every record."""
    backends: list[str] = field(default_factory=lambda: ["cpu"])
    """Local attention kernels (``longreach.kernels`` backend names: cpu, cpu_sparse, reference, triton, flash, flex, auto)."""
    masks: list[str] = field(default_factory=lambda: ["causal"])
    """Masks: causal, full (non-causal) or a ``longreach bench kernels`` mask name."""
    strategies: list[str] = field(default_factory=lambda: ["ring", "ulysses", "allgather"])
    """Context-parallel strategies for world sizes > 1 (world size 1 runs one single-rank point)."""
    layouts: list[str] = field(default_factory=lambda: ["contiguous", "zigzag"])
    """Sequence layouts."""
    seq_lens: list[int] = field(default_factory=lambda: [1024, 2048])
    """Global sequence lengths."""
    world_sizes: list[int] = field(default_factory=lambda: [1, 2])
    """Rank counts."""
    ulysses_degree: int = 2
    """Hybrid: ranks per Ulysses group."""
    batch: int = 1
    """Sequences per step."""
    heads: int = 4
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (GQA)."""
    head_dim: int = 32
    """Head width."""
    dtype: str = field(default="float32", metadata={"choices": DTYPES})
    """q/k/v dtype."""
    warmup: int = 1
    """Untimed iterations (forward and forward+backward) per point."""
    repeats: int = 3
    """Timed iterations per point (median and spread are over these)."""
    threads: int = 1
    """Torch threads per rank (CPU)."""
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    """Where ranks compute; auto = cuda when available."""
    window: int = 256
    """Sliding window (tokens) of window masks."""
    block: int = 64
    """Block size of power / ssa masks."""
    memory: bool = True
    """Measure peak memory per rank (one extra untimed forward+backward)."""
    max_tokens_per_rank: int = 0
    """Skip points whose seq_len / world exceeds this (0: no limit)."""
    timeout: float = 1800.0
    """Seconds allowed per world size."""
    seed: int = 0
    """Input seed."""

    def __post_init__(self) -> None:
        def check(name: str, values: list, allowed: tuple) -> None:
            if not values:
                raise ValueError(f"sweep.{name} is empty")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"sweep.{name}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")

        check("strategies", self.strategies, STRATEGIES)
        check("layouts", self.layouts, LAYOUTS)
        check("masks", self.masks, MASKS)
        if not self.backends:
            raise ValueError("sweep.backends is empty")
        for name in ("seq_lens", "world_sizes"):
            vals = getattr(self, name)
            if not vals or any(v < 1 for v in vals):
                raise ValueError(f"sweep.{name} must be a non-empty list of integers >= 1, got {vals}")
        for name in ("batch", "heads", "kv_heads", "head_dim", "repeats", "threads", "ulysses_degree", "block", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"sweep.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.max_tokens_per_rank < 0:
            raise ValueError("sweep.warmup and sweep.max_tokens_per_rank must be >= 0")
        if self.heads % self.kv_heads:
            raise ValueError(f"sweep.heads ({self.heads}) must be a multiple of sweep.kv_heads ({self.kv_heads})")


@dataclass(kw_only=True, slots=True)
class SweepFile:
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The sweep (the only section of a bench sweep file)."""


def enumerate_points(cfg: SweepConfig) -> list[dict]:
    """Every point of the sweep, in run order; skipped-before-running points carry ``reason``."""
    points: list[dict] = []
    for world in cfg.world_sizes:
        for backend in cfg.backends:
            for mask in cfg.masks:
                for seq_len in cfg.seq_lens:
                    combos = [("none", "contiguous")] if world == 1 else [
                        (s, lay) for s in cfg.strategies for lay in cfg.layouts]
                    for strategy, layout in combos:
                        pt: dict[str, Any] = {"backend": backend, "mask": mask, "strategy": strategy, "layout": layout,
                                              "seq_len": seq_len, "world": world,
                                              "ulysses_degree": cfg.ulysses_degree if strategy == "hybrid" else None}
                        if strategy == "hybrid" and (world <= cfg.ulysses_degree or world % cfg.ulysses_degree):
                            pt["reason"] = (f"hybrid needs world ({world}) a multiple of ulysses_degree "
                                            f"({cfg.ulysses_degree}) with at least two ring groups")
                        elif strategy == "lasp2" and mask != "causal":
                            pt["reason"] = f"lasp2 is linear attention: mask {mask!r} does not apply (causal only)"
                        elif strategy == "lasp2" and layout == "stripe":
                            pt["reason"] = "lasp2 does not support layout 'stripe'"
                        elif cfg.max_tokens_per_rank and seq_len // world > cfg.max_tokens_per_rank:
                            pt["reason"] = (f"seq_len/world = {seq_len // world} exceeds sweep.max_tokens_per_rank "
                                            f"({cfg.max_tokens_per_rank})")
                        pt["id"] = len(points)
                        points.append(pt)
    return points


def summarize_times(times: list[float]) -> dict[str, float]:
    """median, min, max, inter-quartile range and (max − min)/median of a list of seconds."""
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median": med, "min": min(times), "max": max(times), "iqr": q[2] - q[0],
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0, "all": list(times)}


def _density(mask_name: str, seq_len: int, heads: int, cfg: SweepConfig) -> float:
    if mask_name == "full":
        return 1.0
    if mask_name == "causal":
        return causal_density(seq_len)
    mask, _ = build_point_mask(mask_name, seq_len, window=cfg.window, block=cfg.block, seed=cfg.seed)
    return mask_density(mask, seq_len, heads)


def _settings(cfg: SweepConfig) -> dict:
    return {"batch": cfg.batch, "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "dtype": cfg.dtype, "warmup": cfg.warmup, "repeats": cfg.repeats, "device": cfg.device,
            "window": cfg.window, "block": cfg.block, "memory": cfg.memory, "seed": cfg.seed}


def _combine(pt: dict, per_rank: list[dict], cfg: SweepConfig, env: dict, density_cache: dict) -> dict:
    """One record from the per-rank raw results of a point."""
    world = pt["world"]
    rec: dict[str, Any] = {
        "kind": "sweep_point", "sweep": cfg.name, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {"backend": pt["backend"], "mask": pt["mask"], "strategy": pt["strategy"], "layout": pt["layout"],
                   "seq_len": pt["seq_len"], "world": world, "ulysses_degree": pt["ulysses_degree"],
                   "batch": cfg.batch, "heads": cfg.heads,
                   "kv_heads": cfg.heads if pt["strategy"] == "lasp2" else cfg.kv_heads,
                   "head_dim": cfg.head_dim, "dtype": cfg.dtype, "warmup": cfg.warmup, "repeats": cfg.repeats,
                   "threads": cfg.threads, "device": per_rank[0].get("device") if per_rank else cfg.device},
        "hardware": env["hardware"], "software": env["software"],
    }
    bad = [r for r in per_rank if r.get("status") != "ok"]
    if bad:
        rec["status"] = bad[0].get("status", "error")
        rec["reason"] = bad[0].get("reason", "")
        return rec
    rec["status"] = "ok"
    s, b = pt["seq_len"], cfg.batch
    key = (pt["mask"], s)
    if key not in density_cache:
        density_cache[key] = _density(pt["mask"], s, cfg.heads, cfg)
    density = density_cache[key]
    fwd = [max(ts) for ts in zip(*(r["time_fwd"] for r in per_rank))]
    fb = [max(ts) for ts in zip(*(r["time_fwd_bwd"] for r in per_rank))]
    tf, tfb = summarize_times(fwd), summarize_times(fb)
    if pt["strategy"] == "lasp2":
        flops = float(b * s * cfg.heads * (64 * 2 * cfg.head_dim + 4 * cfg.head_dim * cfg.head_dim))
    else:
        flops = attention_flops(batch=b, seq_len=s, heads=cfg.heads, head_dim=cfg.head_dim, density=density)
    flops_fb = (1 + ATTN_BWD_FACTOR) * flops
    dev = rec["config"]["device"] or "cpu"
    peak = peak_flops(env["hardware"].get("gpu_name"), getattr(torch, cfg.dtype)) if str(dev).startswith("cuda") else None
    peak_total = peak * world if peak else None
    work = [r["work_fwd"] for r in per_rank]
    mean_work = statistics.mean(work) if work else 0
    rec.update({
        "density": density, "flops_fwd": flops, "flops_fwd_bwd": flops_fb,
        "time_fwd": tf, "time_fwd_bwd": tfb,
        "tokens_per_s": b * s / tfb["median"], "tokens_per_s_fwd": b * s / tf["median"],
        "tflops_fwd": flops / tf["median"] / 1e12, "tflops_fwd_bwd": flops_fb / tfb["median"] / 1e12,
        "peak_flops_per_rank": peak,
        "mfu_fwd": flops / tf["median"] / peak_total if peak_total else None,
        "mfu_fwd_bwd": flops_fb / tfb["median"] / peak_total if peak_total else None,
        "memory": {"peak_bytes_per_rank": [r.get("peak_bytes") for r in per_rank],
                   "peak_bytes_max": max((r.get("peak_bytes") or 0) for r in per_rank),
                   "method": per_rank[0].get("memory_method"),
                   "rss_peak_kb_per_rank": [r.get("rss_peak_kb") for r in per_rank]},
        "comm": {"fwd_bytes_per_rank": [r["sent_fwd"] for r in per_rank],
                 "bwd_bytes_per_rank": [r["sent_bwd"] for r in per_rank],
                 "fwd_bytes_max": max(r["sent_fwd"] for r in per_rank),
                 "bwd_bytes_max": max(r["sent_bwd"] for r in per_rank),
                 "fwd_calls": per_rank[0]["calls_fwd"], "bwd_calls": per_rank[0]["calls_bwd"]},
        "balance": {"work_fwd_per_rank": work, "work_bwd_per_rank": [r["work_bwd"] for r in per_rank],
                    "work_max_over_mean": max(work) / mean_work if mean_work else None},
    })
    return rec


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ
                                                      and "MASTER_ADDR" in os.environ)


def _run_world(world: int, points: list[dict], cfg: SweepConfig) -> list[list[dict]]:
    """Raw per-rank results, indexed [point][rank]."""
    if _under_torchrun():
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            dist.init_process_group(backend)
        torch.set_num_threads(cfg.threads)
        mine = sweep_worker(dist.get_rank(), dist.get_world_size(), points, _settings(cfg))
        gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, mine)
        return [list(ranks) for ranks in zip(*gathered)]
    per_rank = run_ranks(sweep_worker, world, args=(points, _settings(cfg)), timeout=cfg.timeout, threads=cfg.threads)
    return [list(ranks) for ranks in zip(*per_rank)]


def run_sweep(cfg: SweepConfig, out: str | Path, *, log=print) -> list[dict]:
    """Run every point of ``cfg`` and append one record per point to ``out``; returns the records."""
    env = {"hardware": hardware_info(), "software": software_versions()}
    env["hardware"]["torch_threads_per_rank"] = cfg.threads
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    points = enumerate_points(cfg)
    density_cache: dict = {}
    records: list[dict] = []
    torchrun_world = int(os.environ.get("WORLD_SIZE", "0")) if _under_torchrun() else 0
    writer = not torchrun_world or int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 writes

    def emit(rec: dict) -> None:
        records.append(rec)
        if not writer:
            return
        with open(out, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        c = rec["config"]
        head = (f"P={c['world']} {c['backend']:<9} {c['mask']:<14} {c['strategy']:<9} {c['layout']:<10} "
                f"S={c['seq_len']:<7}")
        if rec["status"] == "ok":
            log(f"{head} fwd {1e3 * rec['time_fwd']['median']:9.1f} ms  fwd+bwd "
                f"{1e3 * rec['time_fwd_bwd']['median']:9.1f} ms  {rec['tokens_per_s']:10.0f} tok/s  "
                f"sent/rank {rec['comm']['fwd_bytes_max'] / 2**20:7.2f} MiB  "
                f"balance {rec['balance']['work_max_over_mean'] or 1:.2f}")
        else:
            log(f"{head} {rec['status']}: {rec.get('reason', '')}")

    for world in sorted(set(cfg.world_sizes)):
        mine = [p for p in points if p["world"] == world]
        pre = [p for p in mine if "reason" in p]
        todo = [p for p in mine if "reason" not in p]
        if torchrun_world and world != torchrun_world:
            for p in todo:
                p["reason"] = f"launched under torchrun with WORLD_SIZE={torchrun_world}"
            pre, todo = mine, []
        for p in pre:
            emit(_combine(p, [{"status": "skipped", "reason": p["reason"]}], cfg, env, density_cache))
        if not todo:
            continue
        try:
            raw = _run_world(world, todo, cfg)
        except Exception as e:  # noqa: BLE001 - one broken world size must not lose the others
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]
            for p in todo:
                emit(_combine(p, [{"status": "error", "reason": msg}], cfg, env, density_cache))
            continue
        for p, per_rank in zip(todo, raw):
            emit(_combine(p, per_rank, cfg, env, density_cache))
    return records


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach bench sweep", description=__doc__.split("\n\n")[0],
                                epilog="Any field can be overridden: --sweep.seq_lens=[1024,4096] --sweep.repeats=5")
    p.add_argument("config", help="sweep YAML file (or a packaged recipe name, e.g. bench_cpu_sweep)")
    p.add_argument("--out", default="results.jsonl", help="results file to append to (default results.jsonl)")
    p.add_argument("--print-config", action="store_true", help="print the resolved sweep and its points, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``longreach bench sweep``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--sweep.")]
    rest = [a for a in argv if not a.startswith("--sweep.")]
    args = _parser().parse_args(rest)
    try:
        cfg = load_config(SweepFile, args.config, overrides).sweep
    except ConfigError:
        raise
    except ValueError as e:  # pragma: no cover - load_config wraps __post_init__ errors already
        raise UserError(f"{args.config}: {e}") from None
    points = enumerate_points(cfg)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        print(f"{len(points)} points ({sum('reason' in p for p in points)} skipped before running)")
        return 0
    print(f"longreach bench sweep {cfg.name}: {len(points)} points, world sizes {sorted(set(cfg.world_sizes))}, "
          f"appending to {args.out}", flush=True)
    t0 = time.perf_counter()
    recs = run_sweep(cfg, args.out, log=lambda s: print(s, flush=True))
    n_ok = sum(r["status"] == "ok" for r in recs)
    print(f"{n_ok} ok, {len(recs) - n_ok} skipped/error in {time.perf_counter() - t0:.0f} s → {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
