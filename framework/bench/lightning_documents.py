"""Packed documents in linear attention: each lightning backend and LASP-1/2 against each document alone.

    python -m longreach.bench.lightning_documents [--ranks 2,4] [--json FILE]

For every lightning backend (``naive``, ``chunk``, ``recurrent`` in float64, ``chunk`` in float32 and
``triton`` in float32 — interpreted on CPU) and for LASP-1/LASP-2 on 2 and 4 gloo ranks in the
contiguous and zigzag layouts (float64 and float32), packed rows (a boundary on a block edge,
single-token documents, a tail after the last offset, different offsets per row) are compared with the
float64 naive kernel run on each document alone: the largest relative error (‖got − want‖ / ‖want‖)
and the largest absolute error over the output, the final state and every gradient (dq, dk, dv and
d(initial state) for the kernels; output and dq, dk, dv per rank for LASP).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

__all__ = ["kernel_errors", "lasp_errors", "main"]

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
    from longreach.kernels import lightning_attention
    from longreach.workers.lasp import each_document_alone

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
    from longreach.testing import run_ranks
    from longreach.workers.lasp import lasp_documents_errors

    worst: dict[tuple[str, str, str], dict[str, Any]] = {}
    for rank_rows in run_ranks(lasp_documents_errors, world_size):
        for r in rank_rows:
            key = (r["variant"], r["layout"], r["dtype"])
            row = worst.setdefault(key, {"ranks": world_size, "variant": key[0], "layout": key[1], "dtype": key[2],
                                         "rel_err": 0.0, "max_abs_err": 0.0})
            row["rel_err"] = max(row["rel_err"], r["rel_err"])
            row["max_abs_err"] = max(row["max_abs_err"], r["max_abs_err"])
    return list(worst.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longreach.bench.lightning_documents",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,4", help="comma-separated LASP world sizes (default 2,4; empty: skip)")
    p.add_argument("--json", default=None, help="also write the rows here")
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kernels": kernels, "lasp": lasp}, f, indent=1)
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():  # the Triton kernels run interpreted on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
