"""Packed documents in linear attention: each lightning backend and LASP-1/2 against each document alone.

    python -m longreach.bench.lightning_documents [--ranks 2,4] [--json FILE] [--timing-seq-len 8192]

For every lightning backend (``naive``, ``chunk``, ``recurrent`` in float64, ``chunk`` in float32 and
``triton`` in float32 — interpreted on CPU) and for LASP-1/LASP-2 on 2 and 4 gloo ranks in the
contiguous and zigzag layouts (float64 and float32), packed rows (a boundary on a block edge,
single-token documents, a tail after the last offset, different offsets per row) are compared with the
float64 naive kernel run on each document alone: the largest relative error (‖got − want‖ / ‖want‖)
and the largest absolute error over the output, the final state and every gradient (dq, dk, dv and
d(initial state) for the kernels; output and dq, dk, dv per rank for LASP). With ``--timing-seq-len``
it also times the ``chunk`` kernel's forward+backward with and without documents (interleaved rounds
in one process, one thread, median and spread).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from longreach.bench.lasp_ranks import each_document_alone, lasp_documents_errors
from longreach.kernels import lightning_attention
from longreach.testing import run_ranks

__all__ = ["documents_timing", "kernel_errors", "lasp_errors", "main"]

KERNELS = [("naive", torch.float64), ("chunk", torch.float64), ("recurrent", torch.float64),
           ("chunk", torch.float32), ("triton", torch.float32)]


def _errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    rel = max(float((g.detach().double() - w).norm() / w.norm()) for g, w in zip(got, want))
    absolute = max(float((g.detach().double() - w).abs().max()) for g, w in zip(got, want))
    return rel, absolute


def kernel_errors(backend: str, dtype: torch.dtype, *, seq_len: int = 77, chunk: int = 16) -> dict[str, Any]:
    """One backend on packed rows with an initial state, against each document alone (float64 naive).

    Returns ``{"backend", "dtype", "rel_err", "max_abs_err"}``, the largest over out, state, dq, dk, dv, ds0
    and over two document layouts (shared offsets; different offsets per row).
    """
    g = torch.Generator().manual_seed(seq_len)
    b, h, d, e = 2, 3, 16, 16
    q, k = (torch.randn(b, seq_len, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    v, dout = (torch.randn(b, seq_len, h, e, generator=g, dtype=torch.float64) for _ in range(2))
    s0, dstate = (torch.randn(b, h, d, e, generator=g, dtype=torch.float64) for _ in range(2))
    decay = torch.tensor([0.9, 0.05, 0.002], dtype=torch.float64)
    layouts = [torch.tensor([0, 1, chunk, chunk + 1, seq_len // 2 + 1, seq_len - 1]),
               (torch.tensor([0, seq_len]), torch.tensor([0, 3, 2 * chunk, 2 * chunk + 1, seq_len]))]
    worst = (0.0, 0.0)
    for cu in layouts:
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [s0.to(torch.float32 if dtype != torch.float64
                                                                           else dtype).requires_grad_()]
        out, state = lightning_attention(*inputs[:3], decay.to(dtype), backend=backend, chunk_size=chunk,
                                         initial_state=inputs[3], return_state=True, cu_seqlens=cu)
        loss = (out.double() * dout).sum() + (state.double() * dstate).sum()
        got = [out, state, *torch.autograd.grad(loss, inputs)]
        ref_in = [x.detach().double().requires_grad_() for x in inputs]
        ref, ref_state = each_document_alone(*ref_in[:3], decay, list(cu) if isinstance(cu, tuple) else [cu], ref_in[3])
        loss = (ref * dout).sum() + (ref_state * dstate).sum()
        want = [ref.detach(), ref_state.detach(), *torch.autograd.grad(loss, ref_in)]
        worst = tuple(max(a, b) for a, b in zip(worst, _errors(got, want)))  # type: ignore[assignment]
    return {"backend": backend, "dtype": str(dtype).split(".")[-1], "rel_err": worst[0], "max_abs_err": worst[1]}


def lasp_errors(world_size: int) -> list[dict[str, Any]]:
    """LASP-1/2 × contiguous/zigzag × float64/float32 on ``world_size`` gloo ranks: the largest errors over
    ranks, document layouts and tensors (out, dq, dk, dv) of each combination."""
    worst: dict[tuple[str, str, str], dict[str, Any]] = {}
    for rank_rows in run_ranks(lasp_documents_errors, world_size):
        for r in rank_rows:
            key = (r["variant"], r["layout"], r["dtype"])
            row = worst.setdefault(key, {"ranks": world_size, "variant": key[0], "layout": key[1], "dtype": key[2],
                                         "rel_err": 0.0, "max_abs_err": 0.0})
            row["rel_err"] = max(row["rel_err"], r["rel_err"])
            row["max_abs_err"] = max(row["max_abs_err"], r["max_abs_err"])
    return list(worst.values())


def documents_timing(seq_len: int, *, rounds: int = 7, n_docs: int = 16, heads: int = 4, head_dim: int = 64
                     ) -> dict[str, Any]:
    """Forward+backward seconds of the ``chunk`` kernel (float32, B = 1) without and with ``n_docs`` equal
    packed documents, in interleaved rounds (the first discarded): ``{"plain": [...], "documents": [...]}``
    with the median and the spread (max − min) of each."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, heads, head_dim, generator=g) for _ in range(3))
    decay = torch.tensor([0.5 ** (h + 1) for h in range(heads)])
    cu = torch.linspace(0, seq_len, n_docs + 1).long()
    times: dict[str, list[float]] = {"plain": [], "documents": []}
    for r in range(rounds + 1):
        for name, docs in (("plain", None), ("documents", cu)):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            t0 = time.perf_counter()
            lightning_attention(*leaves, decay, backend="chunk", cu_seqlens=docs).sum().backward()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"seq_len": seq_len, "n_docs": n_docs, "rounds": rounds}
    for name, ts in times.items():
        ts.sort()
        out[name] = {"median_s": ts[len(ts) // 2], "spread_s": ts[-1] - ts[0]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longreach.bench.lightning_documents",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,4", help="comma-separated LASP world sizes (default 2,4; empty: skip)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--timing-seq-len", type=int, default=0,
                   help="also time chunk forward+backward with/without 16 documents at this length (0: skip)")
    args = p.parse_args(argv)
    try:
        ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    except ValueError:
        print(f"error: --ranks must be comma-separated integers, got {args.ranks!r}", file=sys.stderr)
        return 2
    if any(r < 1 for r in ranks):
        print(f"error: --ranks must be positive, got {args.ranks!r}", file=sys.stderr)
        return 2
    print("| lightning backend | dtype | max rel err | max abs err |\n|---|---|---|---|")
    kernels = []
    for backend, dtype in KERNELS:
        row = kernel_errors(backend, dtype)
        kernels.append(row)
        print(f"| {row['backend']} | {row['dtype']} | {row['rel_err']:.1e} | {row['max_abs_err']:.1e} |", flush=True)
    lasp = []
    if ranks:
        print("\n| LASP | ranks | layout | dtype | max rel err | max abs err |\n|---|---|---|---|---|---|")
    for world_size in ranks:
        for row in lasp_errors(world_size):
            lasp.append(row)
            print(f"| {row['variant']} | {row['ranks']} | {row['layout']} | {row['dtype']} | {row['rel_err']:.1e} "
                  f"| {row['max_abs_err']:.1e} |", flush=True)
    timing = None
    if args.timing_seq_len > 0:
        torch.set_num_threads(1)
        timing = documents_timing(args.timing_seq_len)
        print(f"\nchunk fwd+bwd, S={timing['seq_len']}, 1 thread, median (spread) of {timing['rounds']} "
              f"interleaved rounds: plain {timing['plain']['median_s']:.3f}s ({timing['plain']['spread_s']:.3f}), "
              f"{timing['n_docs']} documents {timing['documents']['median_s']:.3f}s "
              f"({timing['documents']['spread_s']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kernels": kernels, "lasp": lasp, "timing": timing}, f, indent=1)
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():  # the Triton kernels run interpreted on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
