"""Rank-side code of ``longreach bench sweep``: time, bytes, work and memory of every point of one world size.

``sweep_worker(rank, world, points, settings)`` runs on each spawned rank (``longreach.testing.run_ranks``)
or under torchrun, and returns one dict per point with this rank's raw measurements; the parent
(:mod:`longreach.bench.sweep`) combines ranks (max over ranks per repeat) and writes the records.

Peak memory on CPU is measured in an extra, untimed forward+backward pass under
:class:`LiveTensorBytes`, a dispatch mode that adds up the storage bytes of every tensor an operator
creates and subtracts them when the storage is freed: the peak of live tensor bytes allocated during
the pass (inputs excluded). On CUDA it is ``torch.cuda.max_memory_allocated`` minus what was allocated
before the pass.
"""
from __future__ import annotations

import resource
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longreach.bench.kernels import build_mask
from longreach.parallel import CommRecorder, WorkCounter, cp_attention, linear_cp_attention, shard_sequence

__all__ = ["LiveTensorBytes", "build_point_mask", "sweep_worker"]

SKIP_ERRORS = (ValueError, TypeError, NotImplementedError)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by operators while active (CPU memory accounting).

    Storages are identified by data pointer and released when their weak reference expires, so views
    are not double counted and freed buffers stop counting. Only allocations made by operators are
    seen (what attention and its communication buffers allocate), not Python or allocator overhead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        dead = [ptr for ptr, (ref, _) in self.live.items() if ref.expired()]
        for ptr in dead:
            self.current -= self.live.pop(ptr)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
                if nbytes and ptr not in self.live:
                    self.live[ptr] = (StorageWeakRef(st), nbytes)
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def build_point_mask(name: str, seq_len: int, *, window: int, block: int, seed: int = 0):
    """(mask or None, causal flag) for a sweep mask name; ``full`` is non-causal attention."""
    if name == "full":
        return None, False
    if name == "causal":
        return None, True
    return build_mask(name, seq_len, window=window, block=block, seed=seed), True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


class _Point:
    """One point's inputs (this rank's shards) and its attention call, built from seeded full tensors."""

    def __init__(self, pt: dict, st: dict, device: torch.device) -> None:
        torch.manual_seed(st["seed"])
        dtype = getattr(torch, st["dtype"])
        b, s, h, d = st["batch"], pt["seq_len"], st["heads"], st["head_dim"]
        linear = pt["strategy"] == "lasp2"
        hkv = h if linear else st["kv_heads"]
        q = torch.randn(b, s, h, d, dtype=dtype)  # [B, S, H, D]
        k = torch.randn(b, s, hkv, d, dtype=dtype)  # [B, S, Hkv, D]
        v = torch.randn(b, s, hkv, d, dtype=dtype)  # [B, S, Hkv, D]
        do = torch.randn(b, s, h, d, dtype=dtype)  # [B, S, H, D]
        layout = pt["layout"]
        self.q, self.k, self.v, self.do = (shard_sequence(t, layout=layout).to(device) for t in (q, k, v, do))
        for t in (self.q, self.k, self.v):
            t.requires_grad_(True)
        if linear:
            decay = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], dtype=torch.float32, device=device)
            self._call = lambda a, bb, c: linear_cp_attention(a, bb, c, decay, variant="lasp2", layout=layout)
        else:
            mask, causal = build_point_mask(pt["mask"], s, window=st["window"], block=st["block"], seed=st["seed"])
            strategy = "ring" if pt["strategy"] == "none" else pt["strategy"]
            kw = dict(strategy=strategy, layout=layout, causal=causal, mask=mask, backend=pt["backend"],
                      ulysses_degree=pt.get("ulysses_degree") if strategy == "hybrid" else None)
            self._call = lambda a, bb, c: cp_attention(a, bb, c, **kw)

    def call(self) -> torch.Tensor:
        return self._call(self.q, self.k, self.v)

    def fwd(self) -> None:
        with torch.no_grad():
            self.call()

    def fwd_bwd(self) -> None:
        for t in (self.q, self.k, self.v):
            t.grad = None
        self.call().backward(self.do)


def _prepare(world: int, pt: dict, st: dict, device: torch.device) -> dict:
    """Warm-up (where invalid settings raise, alike on all ranks, before any communication), then bytes,
    work and peak memory of one forward and one backward (untimed)."""
    p = _Point(pt, st, device)
    for _ in range(max(1, st["warmup"])):
        p.fwd()
        p.fwd_bwd()
    _sync(device)
    rec: dict[str, Any] = {"status": "ok", "time_fwd": [], "time_fwd_bwd": []}
    for t in (p.q, p.k, p.v):
        t.grad = None
    with CommRecorder() as crec, WorkCounter() as work:
        out = p.call()
    with CommRecorder() as brec, WorkCounter() as bwork:
        out.backward(p.do)
    del out
    rec.update(sent_fwd=crec.bytes_sent(), sent_bwd=brec.bytes_sent(), calls_fwd=dict(crec.calls),
               calls_bwd=dict(brec.calls), work_fwd=work.computed.get("fwd", 0), work_bwd=bwork.computed.get("bwd", 0))
    if st["memory"]:
        for t in (p.q, p.k, p.v):
            t.grad = None
        _barrier(world)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            p.fwd_bwd()
            _sync(device)
            rec["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
            rec["memory_method"] = "cuda_max_allocated"
        else:
            with LiveTensorBytes() as live:
                p.fwd_bwd()
            rec["peak_bytes"] = live.peak
            rec["memory_method"] = "live_tensor_bytes"
    rec["rss_peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rec


def _time_once(world: int, pt: dict, st: dict, device: torch.device) -> tuple[float, float]:
    """One timed forward and one timed forward+backward of a point (fresh inputs, barrier before each)."""
    p = _Point(pt, st, device)
    _barrier(world)
    t0 = time.perf_counter()
    p.fwd()
    _sync(device)
    t_fwd = time.perf_counter() - t0
    _barrier(world)
    t0 = time.perf_counter()
    p.fwd_bwd()
    _sync(device)
    return t_fwd, time.perf_counter() - t0


def sweep_worker(rank: int, world: int, points: list[dict], settings: dict) -> list[dict]:
    """Run every point of this world size on this rank.

    Args:
        points: dicts with ``id``, ``backend``, ``mask``, ``strategy``, ``layout``, ``seq_len`` and
            ``ulysses_degree`` (hybrid).
        settings: ``batch``, ``heads``, ``kv_heads``, ``head_dim``, ``dtype``, ``warmup``, ``repeats``,
            ``device``, ``window``, ``block``, ``memory``, ``seed``.

    Returns:
        One dict per point: ``status`` ok | skipped (with ``reason``) and this rank's raw measurements.
    """
    dev = settings["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.cuda.set_device(rank % max(1, torch.cuda.device_count()))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    results: dict[int, dict] = {}
    for pt in points:
        try:
            rec = _prepare(world, pt, settings, device)
        except SKIP_ERRORS as e:
            rec = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
        rec["id"] = pt["id"]
        rec["device"] = str(device)
        results[pt["id"]] = rec
    # Timed repeats go round-robin over the points rather than point by point: on a shared machine a
    # burst of foreign load then spreads over many points' single repeats instead of all repeats of one.
    ok = [pt for pt in points if results[pt["id"]]["status"] == "ok"]
    for _ in range(settings["repeats"]):
        for pt in ok:
            t_fwd, t_fb = _time_once(world, pt, settings, device)
            results[pt["id"]]["time_fwd"].append(t_fwd)
            results[pt["id"]]["time_fwd_bwd"].append(t_fb)
    return [results[pt["id"]] for pt in points]
