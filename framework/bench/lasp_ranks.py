"""Rank-side code and oracle of the LASP benchmarks (run by :func:`longreach.testing.run_ranks`).

* :func:`each_document_alone` is the float64 oracle for packed documents: naive lightning attention on
  each document on its own (shared by the kernel tests and ``python -m longreach.bench.lightning_documents``).
* :func:`lasp_documents_errors` measures LASP-1/LASP-2 with packed documents against it, per rank.
* :func:`lasp_bench` times LASP-1 vs LASP-2 forward+backward and counts their bytes per rank
  (``longreach bench lightning``).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.distributed as dist

from longreach.kernels.lightning import lightning_attention
from longreach.parallel import shard_sequence
from longreach.parallel.comm import CommRecorder
from longreach.parallel.lasp import lasp_attention, linear_cp_attention
from longreach.parallel.layouts import layout_multiple


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ‖a − b‖ / ‖b‖ (Frobenius norms, float64)."""
    return float((a.detach().double() - b.detach().double()).norm() / b.double().norm().clamp_min(1e-30))


def lasp_inputs(seq_len: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded ``(q, k [2, S, 3, 4], v, dout [2, S, 3, 5], decay [3])`` drawn in float64, cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    b, h, d, e = 2, 3, 4, 5
    q = torch.randn(b, seq_len, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, seq_len, h, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, seq_len, h, e, generator=g, dtype=torch.float64)
    dout = torch.randn(b, seq_len, h, e, generator=g, dtype=torch.float64)
    decay = torch.tensor([1.0, 0.1, 0.001], dtype=torch.float64)
    return tuple(x.to(dtype) for x in (q, k, v, dout, decay))


def each_document_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                        cu_rows: list[torch.Tensor], initial_state: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle for packed documents: naive lightning attention on each document of each row on its own.

    Args:
        q, k: ``[B, S, H, D]``; v: ``[B, S, H, E]``; decay: ``[H]``.
        cu_rows: document offsets, one ``[n+1]`` tensor shared by every row or one per row.
        initial_state: ``[B, H, D, E]`` or None; it enters the first document of its row only.

    Returns:
        ``(out [B, S, H, E], state [B, H, D, E])``: outputs of every document concatenated, and the
        final state of each row's last document. Differentiable (autograd through the naive kernel).
    """
    b, s = q.shape[:2]
    outs, states = [], []
    for row in range(b):
        cu = cu_rows[row if len(cu_rows) > 1 else 0]
        edges = sorted({int(x) for x in cu.tolist()} | {0, s})
        parts, state = [], None
        for start, end in zip(edges[:-1], edges[1:]):
            if end == start:
                continue
            init = initial_state[row:row + 1] if initial_state is not None and start == 0 else None
            o, state = lightning_attention(*(x[row:row + 1, start:end] for x in (q, k, v)), decay, backend="naive",
                                           initial_state=init, return_state=True)
            parts.append(o)
        outs.append(torch.cat(parts, dim=1))
        states.append(state)
    return torch.cat(outs), torch.cat(states)


def packed_offsets(seq_len: int, chunk: int) -> list[Any]:
    """Document layouts for LASP checks: a boundary on a chunk edge, single-token documents, documents
    spanning chunks (and ranks), a tail after the last offset, and different offsets per row (B = 2)."""
    def cu(points: set[int]) -> torch.Tensor:
        return torch.tensor(sorted(p for p in points if 0 <= p <= seq_len))

    return [cu({0, 1, chunk, chunk + 1, 2 * chunk + 2, seq_len - 1, seq_len}),
            cu({0, chunk - 2, seq_len - chunk + 1}),
            (cu({0, seq_len}), cu({0, 3, 3 * chunk, 3 * chunk + 1, seq_len}))]


def lasp_documents_errors(rank: int, world_size: int) -> list[dict[str, Any]]:
    """LASP-1/2 × contiguous/zigzag × :func:`packed_offsets` × float64/float32: the relative error of this
    rank's output and dq/dk/dv against its shard of each document run alone (float64 oracle).

    Returns one row per (variant, layout, dtype, offsets, tensor): ``{"variant", "layout", "dtype",
    "offsets", "name", "rel_err", "max_abs_err", "dtype_ok"}``.
    """
    rows: list[dict[str, Any]] = []
    for layout in ("contiguous", "zigzag"):
        chunk = 5  # odd chunk length
        seq_len = layout_multiple(layout, world_size) * chunk
        q, k, v, dout, decay = lasp_inputs(seq_len, torch.float64, seed=seq_len + world_size)
        for cu in packed_offsets(seq_len, chunk):
            docs = list(cu) if isinstance(cu, tuple) else [cu]
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            ref, _ = each_document_alone(*leaves, decay, docs)
            ref_grads = torch.autograd.grad((ref * dout).sum(), leaves)
            for variant in ("lasp1", "lasp2"):
                for dtype in (torch.float64, torch.float32):
                    local = [shard_sequence(x.to(dtype), layout=layout).requires_grad_() for x in (q, k, v)]
                    out = linear_cp_attention(*local, decay.to(dtype), variant=variant, layout=layout, cu_seqlens=cu)
                    grads = torch.autograd.grad((out * shard_sequence(dout.to(dtype), layout=layout)).sum(), local)
                    checks = {"out": (out, ref)} | {f"d{n}": (g, r) for n, g, r in zip("qkv", grads, ref_grads)}
                    for name, (got, want) in checks.items():
                        want = shard_sequence(want, layout=layout)
                        rows.append({"variant": variant, "layout": layout, "dtype": str(dtype).split(".")[-1],
                                     "offsets": [c.tolist() for c in docs], "name": name,
                                     "rel_err": rel_error(got, want),
                                     "max_abs_err": float((got.detach().double() - want.detach()).abs().max()),
                                     "dtype_ok": got.dtype == dtype})
    return rows


def lasp_bench(rank: int, world_size: int, *, seq_lens: list[int], batch: int, heads: int, head_dim: int,
               repeats: int, layout: str) -> list[dict[str, Any]]:
    """Forward+backward time and bytes per rank of LASP-1 and LASP-2 at each global sequence length."""
    rows = []
    decay = torch.tensor([0.5 ** (h + 1) for h in range(heads)])
    for seq_len in seq_lens:
        g = torch.Generator().manual_seed(seq_len)
        full = [torch.randn(batch, seq_len, heads, head_dim, generator=g) for _ in range(3)]
        local = [shard_sequence(x, layout=layout) for x in full]
        for variant in ("lasp1", "lasp2"):
            times = []
            fwd, bwd = CommRecorder(), CommRecorder()
            for rep in range(repeats + 1):
                leaves = [x.clone().requires_grad_() for x in local]
                dist.barrier()
                t0 = time.perf_counter()
                with fwd if rep == 0 else contextlib.nullcontext():  # the first run warms up and counts bytes
                    out = lasp_attention(*leaves, decay, variant=variant, layout=layout)
                with bwd if rep == 0 else contextlib.nullcontext():
                    out.sum().backward()
                dist.barrier()
                if rep > 0:
                    times.append(time.perf_counter() - t0)
            rows.append({"variant": variant, "layout": layout, "seq_len": seq_len, "rank": rank,
                         "world_size": world_size, "time_s": min(times),
                         "bytes_sent": fwd.bytes_sent() + bwd.bytes_sent(),
                         "bytes_received": sum(fwd.received.values()) + sum(bwd.received.values()),
                         "bytes_fwd": fwd.bytes_sent(), "bytes_bwd": bwd.bytes_sent(),
                         "calls": sum(fwd.calls.values()) + sum(bwd.calls.values())})
    return rows
