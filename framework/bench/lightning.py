"""``longreach bench kernels --suite lightning``: lightning vs softmax attention, LASP-1 vs LASP-2.

1. Time (forward, or forward+backward with ``--backward``) against sequence length for lightning
   attention (the ``chunk`` kernel on CPU, ``triton`` on CUDA) and causal softmax attention (the ``cpu``
   backend on CPU), with the growth exponent of each fitted on log–log axes (linear ≈ 1, softmax ≈ 2
   once the quadratic term dominates).
2. LASP-1 vs LASP-2 on gloo ranks: forward+backward time and bytes sent/received per rank, next to
   what ring attention would move for the same layer ((P−1) × the local K/V bytes).

Also runnable on its own: ``python -m longreach.bench.lightning --help``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from longreach.bench.lasp_ranks import lasp_bench
from longreach.errors import UserError
from longreach.kernels import attention, lightning_attention, masks
from longreach.testing import run_ranks

__all__ = ["add_arguments", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the lightning suite (``longreach bench kernels`` adds them when it delegates)."""
    p.add_argument("--lightning-seq-lens", default=None,
                   help="comma-separated sequence lengths of the scaling sweep (default: powers of two "
                        "from --seq-len/8 to --seq-len)")
    p.add_argument("--lightning-chunk", type=int, default=64, help="lightning block length (default 64)")
    p.add_argument("--lasp-ranks", type=int, default=2, help="gloo ranks of the LASP comparison (0: skip)")
    p.add_argument("--lasp-seq-lens", default="4096,16384", help="comma-separated global lengths for LASP")
    p.add_argument("--lasp-layout", default="contiguous", choices=("contiguous", "zigzag"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach bench kernels --suite lightning", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192, help="longest sequence of the sweep (default 8192)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", default=None, help="write the results here")
    add_arguments(p)
    return p


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise UserError(f"bench lightning: {what} must be comma-separated integers, got {text!r}") from e
    if not vals or min(vals) < 1:
        raise UserError(f"bench lightning: {what} must list positive lengths, got {text!r}")
    return vals


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def growth_exponent(lengths: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(time) against log(length)."""
    xs = [math.log(n) for n in lengths]
    ys = [math.log(max(t, 1e-9)) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den > 0 else float("nan")


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    """Time lightning vs causal softmax attention over the sweep; rows and fitted exponents."""
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(args, "lightning_seq_lens", None):
        lengths = _ints(args.lightning_seq_lens, "--lightning-seq-lens")
    else:
        top = args.seq_len
        lengths = sorted({max(16, top >> i) for i in range(4)})
    decay = torch.tensor([0.5 ** (h + 1) for h in range(args.heads)], device=dev)
    backward = bool(getattr(args, "backward", False))
    chunk = int(getattr(args, "lightning_chunk", 64))
    soft_backend = "cpu" if dev.type == "cpu" else "auto"
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(args.batch, n, args.heads, args.head_dim, generator=g).to(dev, dtype) for _ in range(3))

        def lin() -> None:
            leaves = [x.clone().requires_grad_(backward) for x in (q, k, v)]
            out = lightning_attention(*leaves, decay, chunk_size=chunk)
            if backward:
                out.float().sum().backward()

        def soft() -> None:
            leaves = [x.clone().requires_grad_(backward) for x in (q, k, v)]
            out = attention(*leaves, mask=masks.causal(), backend=soft_backend)
            if backward:
                out.float().sum().backward()

        t_lin, t_soft = _time(lin, args.repeats), _time(soft, args.repeats)
        rows.append({"seq_len": n, "lightning_s": t_lin, "softmax_s": t_soft, "ratio": t_soft / t_lin})
    exps = {"lightning": growth_exponent(lengths, [r["lightning_s"] for r in rows]),
            "softmax": growth_exponent(lengths, [r["softmax_s"] for r in rows])}
    return {"rows": rows, "exponents": exps, "device": str(dev), "softmax_backend": soft_backend,
            "lightning_backend": "triton" if dev.type == "cuda" else "chunk", "backward": backward}


def lasp(args: argparse.Namespace) -> list[dict[str, Any]]:
    """LASP-1 vs LASP-2 on ``--lasp-ranks`` gloo ranks: per-rank time and bytes."""
    ranks = int(getattr(args, "lasp_ranks", 2))
    lengths = _ints(getattr(args, "lasp_seq_lens", "4096,16384"), "--lasp-seq-lens")
    layout = getattr(args, "lasp_layout", "contiguous")
    results = run_ranks(lasp_bench, ranks, kwargs=dict(seq_lens=lengths, batch=args.batch, heads=args.heads,
                                                       head_dim=args.head_dim, repeats=args.repeats, layout=layout),
                        timeout=1800)
    rows = [row for per_rank in results for row in per_rank]
    for row in rows:
        local_kv = 2 * args.batch * (row["seq_len"] // ranks) * args.heads * args.head_dim * 4
        row["ring_kv_bytes_fwd"] = (ranks - 1) * local_kv  # what ring attention receives per rank in forward
    return rows


def _print_scaling(res: dict[str, Any]) -> None:
    print(f"lightning ({res['lightning_backend']}) vs causal softmax ({res['softmax_backend']}) on "
          f"{res['device']}, {'fwd+bwd' if res['backward'] else 'fwd'}, {torch.get_num_threads()} threads")
    print(f"{'seq_len':>8}{'lightning s':>14}{'softmax s':>12}{'soft/lin':>10}")
    for r in res["rows"]:
        print(f"{r['seq_len']:>8}{r['lightning_s']:>14.4f}{r['softmax_s']:>12.4f}{r['ratio']:>10.2f}")
    e = res["exponents"]
    print(f"growth exponent (time ∝ S^a): lightning a={e['lightning']:.2f}, softmax a={e['softmax']:.2f}")


def _print_lasp(rows: list[dict[str, Any]]) -> None:
    print(f"{'variant':>8}{'layout':>12}{'seq_len':>9}{'rank':>5}{'time s':>10}{'sent B':>10}{'recv B':>10}"
          f"{'ring K/V B':>12}")
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["variant"], r["rank"])):
        print(f"{r['variant']:>8}{r['layout']:>12}{r['seq_len']:>9}{r['rank']:>5}{r['time_s']:>10.4f}"
              f"{r['bytes_sent']:>10}{r['bytes_received']:>10}{r['ring_kv_bytes_fwd']:>12}")
    print("bytes: fwd+bwd per rank (LASP states are B·H·D·E float32, independent of the sequence length); "
          "ring K/V B: a ring-attention forward's receive for the same layer, for scale")


def run(args: argparse.Namespace) -> int:
    """Run the suite on a parsed namespace (``longreach bench kernels`` passes its own)."""
    for name in ("seq_len", "heads", "head_dim", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"bench lightning: --{name.replace('_', '-')} must be >= 1")
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"scaling": scaling(args)}
    _print_scaling(res["scaling"])
    if int(getattr(args, "lasp_ranks", 2)) > 0:
        res["lasp"] = lasp(args)
        _print_lasp(res["lasp"])
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: the lightning suite on its own."""
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
