"""Rank-side code of ``longreach bench cp``: per-rank time, bytes and work of every strategy × layout,
and the side-by-side comparison with peer implementations (``--peers``).

:func:`bench_worker` and :func:`peers_worker` run on each spawned rank (``longreach.testing.run_ranks``)
and return plain records; :mod:`longreach.bench.cp` combines the ranks and prints the tables.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from longreach.kernels import attention, get_backend
from longreach.kernels import masks as M
from longreach.parallel import cp_attention, shard_sequence
from longreach.parallel.comm import CommRecorder, WorkCounter
from longreach.parallel.cp import layout_positions


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



# ------------------------------------------------------------------------------------------------
# side by side with peer implementations (longreach bench cp --peers)
# ------------------------------------------------------------------------------------------------


class CallCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten calls, and calls of the CPU flash kernel (forward or backward), while active."""

    def __init__(self) -> None:
        super().__init__()
        self.aten = 0
        self.kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        self.aten += 1
        if "_scaled_dot_product_flash_attention_for_cpu" in str(func):
            self.kernel += 1
        return func(*args, **(kwargs or {}))


def _peer_impls(world: int, cfg: dict) -> dict:
    """name -> (layout of its inputs, dtype, callable(q, k, v) -> out) for longreach and every peer that
    imports here; or name -> error string."""
    impls: dict = {}
    scale = cfg["head_dim"] ** -0.5
    uly = {"dtype": torch.float32}
    impls["longreach ring zigzag"] = ("zigzag", torch.bfloat16, lambda q, k, v: cp_attention(
        q, k, v, strategy="ring", layout="zigzag", scale=scale))
    impls["longreach ulysses"] = ("contiguous", uly["dtype"], lambda q, k, v: cp_attention(
        q, k, v, strategy="ulysses", layout="contiguous", scale=scale))
    if world >= 4:
        impls["longreach hybrid u=2"] = ("zigzag", torch.bfloat16, lambda q, k, v: cp_attention(
            q, k, v, strategy="hybrid", layout="zigzag", ulysses_degree=2, scale=scale))
    if cfg.get("peers_path") and cfg["peers_path"] not in sys.path:
        sys.path.insert(0, cfg["peers_path"])
    try:
        from longreach.parallel.ring_flash_adapter import _module

        zz = _module("zigzag_ring_flash_attn").zigzag_ring_flash_attn_func
        impls["ring-flash-attn zigzag"] = ("zigzag", torch.bfloat16, lambda q, k, v: zz(
            q, k, v, softmax_scale=scale, causal=True, group=None))
    except Exception as e:  # noqa: BLE001 - a peer that does not import is reported, not fatal
        impls["ring-flash-attn zigzag"] = f"{type(e).__name__}: {str(e)[:120]}"
    try:
        import yunchang  # noqa: F401

        impls["yunchang"] = "installed, but no stand-in call is wired for it yet"
    except Exception as e:  # noqa: BLE001
        impls["yunchang"] = f"not importable ({type(e).__name__})"
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        deepspeed.init_distributed(dist_backend="gloo")
        ds = DistributedAttention(lambda qq, kk, vv, *a, **kw: attention(qq, kk, vv, mask=M.causal(), scale=scale,
                                                                          backend="cpu"),
                                  dist.group.WORLD, scatter_idx=2, gather_idx=1)
        impls["DeepSpeed Ulysses"] = ("contiguous", uly["dtype"], lambda q, k, v: ds(q, k, v, 0))
    except Exception as e:  # noqa: BLE001
        impls["DeepSpeed Ulysses"] = f"{type(e).__name__}: {str(e)[:120]}"
    return impls


PEER_PAIRS = (("longreach ring zigzag", "ring-flash-attn zigzag"), ("longreach ring zigzag", "yunchang"),
              ("longreach ulysses", "DeepSpeed Ulysses"), ("longreach hybrid u=2", "yunchang"))


def _pass(fn, q, k, v, do) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), (q.grad, k.grad, v.grad)


def peers_worker(rank: int, world: int, cfg: dict) -> list[dict]:
    """Interleaved rounds of each (longreach, peer) pair on identical inputs; one record per pair and length."""
    impls = _peer_impls(world, cfg)
    recs: list[dict] = []
    h, d = cfg["heads"], cfg["head_dim"]
    for seq_len in cfg["seq_lens"]:
        g = torch.Generator().manual_seed(cfg["seed"])
        full = [torch.randn(1, seq_len, h, d, generator=g, dtype=torch.float64) for _ in range(4)]  # q, k, v, dout
        ref = get_backend("cpu")
        out_r, lse_r = ref.forward(*full[:3], mask=M.causal())
        grads_r = ref.backward(full[3], *full[:3], out_r, lse_r, mask=M.causal())
        for ours, peer in PEER_PAIRS:
            rec: dict = {"pair": f"{ours} ÷ {peer}", "world": world, "seq_len": seq_len, "rank": rank}
            recs.append(rec)
            missing = [n for n in (ours, peer) if n not in impls or isinstance(impls[n], str)]
            if missing:
                rec["error"] = "; ".join(f"{n}: {impls.get(n, 'needs 4 ranks')}" for n in missing)
                continue
            sides = {}
            for name in (ours, peer):
                layout, dtype, fn = impls[name]
                pos = layout_positions(layout, seq_len, rank, world)
                local = [_shard_positions(t, pos, 1).to(dtype) for t in full]
                try:
                    _pass(fn, *local)  # warm-up (plans, buffers)
                    with CallCounter() as calls:
                        out, grads = _pass(fn, *local)
                except Exception as e:  # noqa: BLE001 - a peer failing on this shape is reported
                    rec["error"] = f"{name}: {type(e).__name__}: {str(e)[:160]}"
                    break
                errs = [_relerr(out, _shard_positions(out_r, pos, 1))]
                errs += [_relerr(gr, _shard_positions(gw, pos, 1)) for gr, gw in zip(grads, grads_r)]
                sides[name] = (fn, local)
                side = "ours" if name == ours else "peer"
                rec[f"{side}_dtype"] = str(dtype).replace("torch.", "")
                rec[f"{side}_kernel_calls"] = calls.kernel
                rec[f"{side}_aten_calls"] = calls.aten
                rec[f"{side}_out_err"], rec[f"{side}_grad_err"] = errs[0], max(errs[1:])
            if "error" in rec:
                continue
            times: dict[str, list[float]] = {ours: [], peer: []}
            for r in range(cfg["rounds"]):
                order = (ours, peer) if r % 2 == 0 else (peer, ours)  # alternate who goes first
                for name in order:
                    fn, local = sides[name]
                    dist.barrier()
                    t0 = time.perf_counter()
                    _pass(fn, *local)
                    el = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(el, op=dist.ReduceOp.MAX)  # a pass takes as long as its slowest rank
                    times[name].append(float(el))
            rec["ours_s"], rec["peer_s"] = times[ours], times[peer]
    return recs
