"""The ranks of ``longreach bench cp --peers``: longreach beside peer implementations on identical inputs.

Pairs (causal, forward + backward): longreach's zigzag ring against ring-flash-attn's and yunchang's
zigzag rings (bf16), longreach's Ulysses against DeepSpeed's ``DistributedAttention`` (float32 and bf16), and
longreach's hybrid (U = 2) against yunchang's USP ``LongContextAttention`` with its zigzag ring (bf16,
4+ ranks). ring-flash-attn and yunchang call flash-attn's ``_flash_attn_forward`` /
``_flash_attn_backward``; a checkout's ``tests/peers`` holds a CPU stand-in for those two functions
that runs the aten CPU flash kernel longreach's ``cpu`` backend runs, so every side computes with
the same kernel and a ratio measures the context-parallel layer. A peer that does not import (not
installed, no stand-in) is skipped with its reason.

Every side gets this rank's tokens of the same seeded float64 sequence under its own layout (USP's
differs from longreach's hybrid layout), is checked against the float64 single-process reference, and
is timed in interleaved rounds (the side that runs first alternates), a pass lasting as long as its
slowest rank (wall clock); the CPU clock of a pass is the CPU time of every rank's computing thread
together (waits for messages excluded), which a shared machine disturbs far less.

Both sides run in one process, so each rank first keeps the heap it frees (:func:`steady_heap`): otherwise
one side's allocations decide when glibc hands memory back, and the other side pays the page faults of
getting it back. Each record carries the page faults per pass of either side.
"""
from __future__ import annotations

import ctypes
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from longreach.kernels import get_backend
from longreach.kernels import masks as M
from longreach.parallel import cp_attention
from longreach.parallel.cp import layout_positions

#: (longreach side, peer side) of every row of the table, in order.
PEER_PAIRS = (
    ("longreach ring zigzag", "ring-flash-attn zigzag"),
    ("longreach ring zigzag", "yunchang ring zigzag"),
    ("longreach ulysses", "DeepSpeed Ulysses"),
    ("longreach ulysses bf16", "DeepSpeed Ulysses bf16"),
    ("longreach hybrid u=2", "yunchang USP u=2"),
)
#: Ranks per Ulysses group of the hybrid pair.
HYBRID_DEGREE = 2


@dataclass
class Side:
    """One implementation as the bench runs it."""

    positions: Callable[[int], torch.Tensor]
    """Global positions of this rank's tokens for a sequence length (LongTensor ``[S/P]``)."""
    dtype: torch.dtype
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``(q, k, v) -> out``, all ``[B, S/P, H, D]`` local tokens."""


class CallCounter(TorchDispatchMode):
    """Counts aten calls, and calls of the CPU flash kernel (forward or backward) with the wall-clock seconds
    spent inside them, while active."""

    def __init__(self) -> None:
        super().__init__()
        self.aten = 0
        self.kernel = 0
        self.kernel_s = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        self.aten += 1
        if "_scaled_dot_product_flash_attention_for_cpu" not in str(func):
            return func(*args, **(kwargs or {}))
        self.kernel += 1
        t0 = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        self.kernel_s += time.perf_counter() - t0
        return result


#: glibc's ``mallopt`` parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX = -1, -3, 32 << 20


def steady_heap() -> str:
    """Make this process keep the memory it frees (glibc): the heap is never trimmed, and blocks under 32 MiB
    come from it rather than from their own mmap, so a freed block is reused instead of handed back to the
    kernel and faulted in again. Under glibc's defaults (trim and mmap thresholds that move with the largest
    block freed so far) each of longreach's and DeepSpeed's Ulysses alone takes about 500–1,000 minor faults
    per pass (2k, W2, float32) on some ranks, and when the two alternate in one process the allocations of
    one decide the faults of the other: longreach's pass took 500–2,500 and DeepSpeed's about 3, and
    buffering longreach's all-to-all moved about 500 per pass onto DeepSpeed's side. With the heap kept,
    both sides take 0–5 per pass. Call it once per process, before timing; it changes the whole process.
    Returns what was done, for the report."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "allocator unchanged (no mallopt)"
    if mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) != 1 or mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) != 1:
        return "allocator unchanged (mallopt refused)"
    return "heap kept (glibc: no trimming, blocks under 32 MiB from the heap)"


def _faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def usp_positions(seq_len: int, rank: int, world: int, degree: int) -> torch.Tensor:
    """Global positions of ``rank`` under yunchang's zigzag USP layout (its ``zigzag_extract_local`` with
    Ulysses groups of ``degree`` consecutive ranks): ring index g = rank // degree holds chunks g and
    2R − 1 − g of 2R (R = world / degree), in order, cut into ``degree`` equal parts over its group."""
    rings = world // degree
    c = seq_len // (2 * rings)
    g, u = divmod(rank, degree)
    mirror = 2 * rings - 1 - g
    group = torch.cat([torch.arange(g * c, (g + 1) * c), torch.arange(mirror * c, (mirror + 1) * c)])
    return group.chunk(degree)[u]


def _layout(layout: str, rank: int, world: int) -> Callable[[int], torch.Tensor]:
    return lambda seq_len: layout_positions(layout, seq_len, rank, world)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:120]}"


def _longreach(rank: int, world: int, scale: float) -> dict[str, Side | str]:
    def side(layout: str, dtype: torch.dtype, **kw) -> Side:
        return Side(_layout(layout, rank, world), dtype,
                    lambda q, k, v: cp_attention(q, k, v, layout=layout, scale=scale, **kw))

    sides: dict[str, Side | str] = {
        "longreach ring zigzag": side("zigzag", torch.bfloat16, strategy="ring"),
        "longreach ulysses": side("contiguous", torch.float32, strategy="ulysses"),
        "longreach ulysses bf16": side("contiguous", torch.bfloat16, strategy="ulysses"),
    }
    if world > HYBRID_DEGREE and world % HYBRID_DEGREE == 0:
        sides["longreach hybrid u=2"] = side("zigzag", torch.bfloat16, strategy="hybrid", ulysses_degree=HYBRID_DEGREE)
    else:
        sides["longreach hybrid u=2"] = f"needs a world size above {HYBRID_DEGREE} that divides by {HYBRID_DEGREE}"
    return sides


def _ring_flash_attn(rank: int, world: int, scale: float) -> dict[str, Side | str]:
    try:
        from longreach.parallel.ring_flash_adapter import _module

        zz = _module("zigzag_ring_flash_attn").zigzag_ring_flash_attn_func
    except Exception as e:  # noqa: BLE001 - a peer that does not import is reported, not fatal
        return {"ring-flash-attn zigzag": _why(e)}
    return {"ring-flash-attn zigzag": Side(_layout("zigzag", rank, world), torch.bfloat16, lambda q, k, v: zz(
        q, k, v, softmax_scale=scale, causal=True, group=None))}


def _yunchang(rank: int, world: int, scale: float) -> dict[str, Side | str]:
    names = ("yunchang ring zigzag", "yunchang USP u=2")
    try:
        import yunchang
        from yunchang.globals import HAS_FLASH_ATTN
        from yunchang.kernels import AttnType
    except Exception as e:  # noqa: BLE001
        missing = isinstance(e, ModuleNotFoundError) and e.name == "yunchang"
        why = "not installed (pip install --no-deps yunchang==0.6.4)" if missing else _why(e)
        return dict.fromkeys(names, why)
    if not HAS_FLASH_ATTN:
        return dict.fromkeys(names, "yunchang found no flash_attn (no tests/peers stand-in on the path)")
    zz = yunchang.zigzag_ring_flash_attn_func
    sides: dict[str, Side | str] = {names[0]: Side(
        _layout("zigzag", rank, world), torch.bfloat16,
        lambda q, k, v: zz(q, k, v, softmax_scale=scale, causal=True, group=None, attn_type=AttnType.FA))}
    if world > HYBRID_DEGREE and world % HYBRID_DEGREE == 0:
        # yunchang keeps its groups in a module-level singleton; every rank creates every group
        yunchang.set_seq_parallel_pg(HYBRID_DEGREE, world // HYBRID_DEGREE, rank, world)
        usp = yunchang.LongContextAttention(ring_impl_type="zigzag", attn_type=AttnType.FA)
        sides[names[1]] = Side(lambda s: usp_positions(s, rank, world, HYBRID_DEGREE), torch.bfloat16,
                               lambda q, k, v: usp(q, k, v, softmax_scale=scale, causal=True))
    else:
        sides[names[1]] = f"needs a world size above {HYBRID_DEGREE} that divides by {HYBRID_DEGREE}"
    return sides


def _deepspeed(rank: int, world: int, scale: float) -> dict[str, Side | str]:
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        from longreach.kernels import attention

        deepspeed.init_distributed(dist_backend="gloo")
        def local(qq, kk, vv, *args, **kwargs):
            return attention(qq, kk, vv, mask=M.causal(), scale=scale, backend="cpu")

        ds = DistributedAttention(local, dist.group.WORLD, scatter_idx=2, gather_idx=1)
    except Exception as e:  # noqa: BLE001
        return dict.fromkeys(("DeepSpeed Ulysses", "DeepSpeed Ulysses bf16"), _why(e))
    return {name: Side(_layout("contiguous", rank, world), dtype, lambda q, k, v: ds(q, k, v, 0))
            for name, dtype in (("DeepSpeed Ulysses", torch.float32), ("DeepSpeed Ulysses bf16", torch.bfloat16))}


def peer_sides(rank: int, world: int, cfg: dict) -> dict[str, Side | str]:
    """name -> :class:`Side` for longreach and every peer that imports here, or name -> why it does not run.

    The flash-attn stand-in folder (``cfg["peers_path"]``) goes first on ``sys.path`` before any peer is
    imported, so ring-flash-attn and yunchang bind to it."""
    if cfg.get("peers_path") and cfg["peers_path"] not in sys.path:
        sys.path.insert(0, cfg["peers_path"])
    scale = cfg["head_dim"] ** -0.5
    sides = _longreach(rank, world, scale)
    for build in (_ring_flash_attn, _yunchang, _deepspeed):
        sides.update(build(rank, world, scale))
    return sides


def _pass(fn, q, k, v, do) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), (q.grad, k.grad, v.grad)


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error / max abs, L2 error / L2 norm) of ``got`` against the float64 ``want``."""
    diff = got.double() - want
    return float(diff.abs().max() / want.abs().max()), float(diff.norm() / want.norm())


def _measure(rec: dict, side: str, s: Side, local: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Warm-up pass, then one counted pass: calls and errors into ``rec`` under ``side``."""
    _pass(s.fn, *local)  # plans, buffers, groups
    with CallCounter() as calls:
        out, grads = _pass(s.fn, *local)
    errs = [errors(got, w) for got, w in zip((out, *grads), want)]
    rec[f"{side}_dtype"] = str(s.dtype).replace("torch.", "")
    rec[f"{side}_kernel_calls"], rec[f"{side}_aten_calls"] = calls.kernel, calls.aten
    rec[f"{side}_out_err"], rec[f"{side}_grad_err"] = errs[0][0], max(e[0] for e in errs[1:])
    rec[f"{side}_out_l2"], rec[f"{side}_grad_l2"] = errs[0][1], max(e[1] for e in errs[1:])


def _kernel_rounds(sides: dict, names: tuple[str, str], inputs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per pass this rank spends inside the flash kernel, per side, over interleaved rounds of their
    own (the dispatch mode that times the kernel slows every other aten call, so these passes are not the
    timed ones)."""
    kernel: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            dist.barrier()
            with CallCounter() as calls:
                _pass(sides[name].fn, *inputs[name])
            kernel[name].append(calls.kernel_s)
    return kernel


def peers_worker(rank: int, world: int, cfg: dict) -> list[dict]:
    """Interleaved rounds of each (longreach, peer) pair on identical inputs; one record per pair and length
    (``error`` and ``skipped`` {name: why} where a side does not run), with this rank's page faults per pass
    (``ours_faults`` / ``peer_faults``) and what :func:`steady_heap` did (``heap``). With ``cfg["split"]``, as
    many rounds again time the kernel alone (``ours_kernel_s`` / ``peer_kernel_s``, this rank's)."""
    heap = steady_heap()
    sides = peer_sides(rank, world, cfg)
    recs: list[dict] = []
    h, d = cfg["heads"], cfg["head_dim"]
    ref = get_backend("cpu")
    for seq_len in cfg["seq_lens"]:
        g = torch.Generator().manual_seed(cfg["seed"])
        # q, k, v, dout of the whole sequence, [1, S, H, D] each
        full = [torch.randn(1, seq_len, h, d, generator=g, dtype=torch.float64) for _ in range(4)]
        out_r, lse_r = ref.forward(*full[:3], mask=M.causal())
        want_full = [out_r, *ref.backward(full[3], *full[:3], out_r, lse_r, mask=M.causal())]
        for ours, peer in (tuple(p) for p in cfg.get("pairs", PEER_PAIRS)):
            rec: dict = {"pair": f"{ours} ÷ {peer}", "world": world, "seq_len": seq_len, "rank": rank, "heap": heap}
            recs.append(rec)
            skipped = {n: sides[n] for n in (ours, peer) if isinstance(sides[n], str)}
            if skipped:
                rec["skipped"] = skipped
                rec["error"] = "; ".join(f"{n}: {why}" for n, why in skipped.items())
                continue
            inputs = {}
            for name, side in ((ours, "ours"), (peer, "peer")):
                s = sides[name]
                pos = s.positions(seq_len)
                local = [t[:, pos].to(s.dtype) for t in full]
                try:
                    _measure(rec, side, s, local, [t[:, pos] for t in want_full])
                except Exception as e:  # noqa: BLE001 - a side failing on this shape is reported
                    rec["error"] = f"{name}: {type(e).__name__}: {str(e)[:160]}"
                    break
                inputs[name] = local
            if "error" in rec:
                continue
            times: dict[str, list[float]] = {ours: [], peer: []}
            cpu: dict[str, list[float]] = {ours: [], peer: []}
            faults: dict[str, list[int]] = {ours: [], peer: []}
            for r in range(cfg["rounds"]):
                for name in ((ours, peer) if r % 2 == 0 else (peer, ours)):  # alternate who goes first
                    dist.barrier()
                    t0, c0, f0 = time.perf_counter(), time.thread_time(), _faults()
                    _pass(sides[name].fn, *inputs[name])
                    wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    used = torch.tensor([time.thread_time() - c0], dtype=torch.float64)
                    faults[name].append(_faults() - f0)
                    dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # a pass takes as long as its slowest rank
                    dist.all_reduce(used)  # CPU time of the pass on every rank's computing thread together
                    times[name].append(float(wall))
                    cpu[name].append(float(used))
            rec["ours_s"], rec["peer_s"] = times[ours], times[peer]
            rec["ours_cpu_s"], rec["peer_cpu_s"] = cpu[ours], cpu[peer]
            rec["ours_faults"], rec["peer_faults"] = faults[ours], faults[peer]
            if cfg.get("split"):
                kernel = _kernel_rounds(sides, (ours, peer), inputs, cfg["rounds"])
                rec["ours_kernel_s"], rec["peer_kernel_s"] = kernel[ours], kernel[peer]
    return recs
