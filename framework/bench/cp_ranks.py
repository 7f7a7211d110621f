"""Rank-side code of ``longreach bench cp``: per-rank time, bytes and work of every strategy × layout
(the ``--peers`` comparison's ranks are :mod:`longreach.bench.cp_peers`).

:func:`bench_worker` runs on each spawned rank (``longreach.testing.run_ranks``) and returns plain
records; :mod:`longreach.bench.cp` combines the ranks and prints the tables.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from longreach.kernels import attention
from longreach.kernels import masks as M
from longreach.parallel import cp_attention, shard_sequence
from longreach.parallel.comm import CommRecorder, WorkCounter


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max relative error of ``a`` against ``b`` over finite entries; inf where non-finite entries differ."""
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not bool((torch.isfinite(a) == fin).all()) or not bool((a[~fin] == b[~fin]).all()):
        return float("inf")
    if not bool(fin.any()):
        return 0.0
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp_min(1e-12))


def _shard_positions(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    return x.index_select(dim, pos.to(x.device)).contiguous()


class AllToAllBytes(TorchDispatchMode):
    """Counts ``all_to_all_single`` calls and the bytes this rank sends ((P−1)/P of each input, as
    :class:`~longreach.parallel.comm.CommRecorder` counts them) for code that calls torch.distributed
    directly (DeepSpeed's Ulysses): c10d collectives pass through the dispatcher, so a dispatch mode sees
    them without patching ``torch.distributed``."""

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.sent = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if func.name().startswith("c10d::alltoall_base"):
            inp = args[1]  # (output, input, group, output_split_sizes, input_split_sizes, ...)
            self.sent += inp.numel() * inp.element_size() * (self.world - 1) // self.world
            self.calls += 1
        return func(*args, **(kwargs or {}))


def bench_worker(rank: int, world: int, cfg: dict) -> list[dict]:
    """Every strategy × layout of ``cfg`` on this world size; one record per (strategy, layout) on each rank."""
    torch.manual_seed(cfg["seed"])
    dtype = getattr(torch, cfg["dtype"])
    s, h, hkv, d, b = cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["batch"]
    q = torch.randn(b, s, h, d, dtype=dtype)
    k = torch.randn(b, s, hkv, d, dtype=dtype)
    v = torch.randn(b, s, hkv, d, dtype=dtype)
    do = torch.randn(b, s, h, d, dtype=dtype)
    recs: list[dict] = []
    for strategy in cfg["strategies"]:
        for layout in cfg["layouts"]:
            rec: dict = {"strategy": strategy, "layout": layout, "world": world, "rank": rank}
            u = cfg.get("ulysses_degree") or (2 if world % 2 == 0 and world > 2 else world)
            kw = dict(strategy=strategy, layout=layout, causal=cfg["causal"],
                      ulysses_degree=u if strategy == "hybrid" else None)
            rec["ulysses_degree"] = kw["ulysses_degree"]
            try:
                ql, kl, vl, dol = (shard_sequence(t, layout=layout) for t in (q, k, v, do))
                ql.requires_grad_(cfg["backward"])
                kl.requires_grad_(cfg["backward"])
                vl.requires_grad_(cfg["backward"])
                with WorkCounter(exact=True) as exact:  # warm-up, also counts the allowed pairs
                    cp_attention(ql, kl, vl, **kw)
                rec["allowed_fwd"] = exact.allowed.get("fwd", 0)
                dist.barrier()
                with CommRecorder() as fwd_rec, WorkCounter() as work:
                    t0 = time.perf_counter()
                    for _ in range(cfg["repeats"]):
                        out = cp_attention(ql, kl, vl, **kw)
                    t_fwd = (time.perf_counter() - t0) / cfg["repeats"]
                rec.update(fwd_sent=sum(fwd_rec.sent.values()) // cfg["repeats"], fwd_calls=dict(fwd_rec.calls),
                           work_fwd=work.computed.get("fwd", 0) // cfg["repeats"], time_fwd=t_fwd)
                if cfg["backward"]:
                    with CommRecorder() as bwd_rec, WorkCounter() as bwork:
                        t0 = time.perf_counter()
                        out.backward(dol)
                        rec["time_bwd"] = time.perf_counter() - t0
                    rec.update(bwd_sent=sum(bwd_rec.sent.values()), work_bwd=bwork.computed.get("bwd", 0))
                esz = ql.element_size()
                q_bytes, kv_bytes = ql.numel() * esz, 2 * kl.numel() * esz
                out_bytes = ql.shape[0] * ql.shape[1] * h * v.shape[-1] * esz
                rec["min_fwd"] = theoretical_min(strategy, world, q_bytes, kv_bytes, out_bytes, h, hkv,
                                                 kw["ulysses_degree"])
            except (ValueError, TypeError) as e:
                rec["error"] = str(e)
            recs.append(rec)
    if cfg.get("deepspeed"):
        recs.append(_deepspeed(rank, world, q, k, v, cfg))
    return recs


def theoretical_min(strategy: str, world: int, q_bytes: int, kv_bytes: int, out_bytes: int, heads: int,
                    kv_heads: int, degree: int | None) -> float | None:
    """Forward bytes a rank must send: ring and all-gather (P−1) × the local K/V bytes; Ulysses (P−1)/P of
    the local q, k, v and out bytes, K/V heads replicated up to the degree counted once per replica;
    None where no minimum is defined."""
    p = world
    if strategy == "ring":
        return (p - 1) * kv_bytes
    if strategy in ("ulysses", "hybrid"):
        u = p if strategy == "ulysses" else int(degree)  # type: ignore[arg-type]
        rep = u / kv_heads if u > kv_heads else 1
        uly = (u - 1) / u * (q_bytes + rep * kv_bytes + out_bytes)
        if strategy == "ulysses":
            return uly
        r = p // u
        return uly + (r - 1) * kv_bytes * rep  # ring over post-all-to-all K/V (U·n tokens, Hkv/U heads)
    if strategy == "allgather":
        return (p - 1) * kv_bytes
    return None


def _deepspeed(rank: int, world: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: dict) -> dict:
    """DeepSpeed's Ulysses DistributedAttention on the same shapes (contiguous layout), where it runs."""
    rec: dict = {"strategy": "deepspeed-ulysses", "layout": "contiguous", "world": world, "rank": rank}
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        deepspeed.init_distributed(dist_backend="gloo")

        def local(qq, kk, vv, *args, **kwargs):
            return attention(qq, kk, vv, mask=M.causal() if cfg["causal"] else None, backend="cpu")

        attn = DistributedAttention(local, dist.group.WORLD, scatter_idx=2, gather_idx=1)
        ql, kl, vl = (shard_sequence(t, layout="contiguous") for t in (q, k, v))
        with AllToAllBytes(world) as sent:  # the warm-up pass counts; the timed ones run without the mode
            attn(ql, kl, vl, 0)
        t0 = time.perf_counter()
        for _ in range(cfg["repeats"]):
            attn(ql, kl, vl, 0)
        rec["time_fwd"] = (time.perf_counter() - t0) / cfg["repeats"]
        rec["fwd_sent"] = sent.sent
        rec["fwd_calls"] = {"all_to_all": sent.calls}
        esz = ql.element_size()
        rec["min_fwd"] = theoretical_min("ulysses", world, ql.numel() * esz, 2 * kl.numel() * esz, ql.numel() * esz,
                                         q.shape[2], k.shape[2], None)
    except Exception as e:  # noqa: BLE001 - DeepSpeed is a comparison, not a requirement
        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return rec
