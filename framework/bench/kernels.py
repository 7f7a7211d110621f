"""``longreach bench kernels``: sparse-mask attention cost against dense causal attention.

For each mask at one sequence length (default 8192 tokens on CPU) it times the block-sparse backend
(``cpu_sparse`` on CPU) against the dense causal ``cpu`` flash kernel, next to the mask's density and the
attention FLOPs its tile plan skips, so "time relative to causal" can be read against "work relative to
causal". With ``--cp`` it also spawns gloo ranks (default 4) and counts the bytes a ring context-parallel step
sends with a sliding window against full causal (:class:`longreach.parallel.CommRecorder`).
``--suite lightning`` hands over to ``longreach.bench.lightning:run(args)``.

    longreach bench kernels                          # 8k tokens, every mask, forward
    longreach bench kernels --seq-len 4096 --backward --cp --json out.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from typing import Any, Callable

import torch

from longreach.errors import UserError

MASK_NAMES = ("causal", "sliding_window", "sinks_window", "documents", "power", "s2_varlen", "s2_roll", "sf", "ssa")


def build_mask(name: str, seq_len: int, *, window: int, block: int, seed: int):
    """The benchmarked mask ``name`` for a sequence of ``seq_len`` tokens (LongLoRA group = N/4)."""
    from longreach.kernels import masks as M

    group = max(2, (seq_len // 4) // 2 * 2)
    table: dict[str, Callable[[], Any]] = {
        "causal": M.causal,
        "sliding_window": lambda: M.sliding_window(window),
        "sinks_window": lambda: M.sinks(4) | M.sliding_window(window),
        "documents": lambda: M.documents([0, seq_len // 8, seq_len // 4, seq_len // 2, seq_len]),
        "power": lambda: M.power(block),
        "s2_varlen": lambda: M.s2(group, "varlen"),
        "s2_roll": lambda: M.s2(group, "roll"),
        "sf": lambda: M.sf(group, 4),
        "ssa": lambda: M.ssa(0.25, window=2, block=block, seed=seed).at(step=1, layer=0),
    }
    if name not in table:
        raise UserError(f"bench kernels: unknown mask {name!r}; choose from {', '.join(MASK_NAMES)}")
    return table[name]()


def mask_density(mask, seq_len: int, heads: int, chunk: int = 1024) -> float:
    """Fraction of the S×S pairs the mask allows, averaged over heads (computed in query chunks)."""
    pos = torch.arange(seq_len)
    allowed = 0
    for lo in range(0, seq_len, chunk):
        d = mask.dense(pos[lo:lo + chunk], pos, heads=torch.arange(heads), num_heads=heads, seq_len=seq_len)
        allowed += int(d.sum()) * (heads // d.shape[0])
    return allowed / (heads * seq_len * seq_len)


def computed_fraction(mask, seq_len: int, heads: int, tile: int) -> float:
    """Fraction of the S×S score elements the tile plan computes (non-empty tiles), averaged over heads."""
    pos = torch.arange(seq_len)
    kind = mask.block_map(pos, pos, block_q=tile, block_k=tile, heads=torch.arange(heads), num_heads=heads,
                          seq_len=seq_len)  # [Hm, nQ, nK]
    rows = torch.clamp(seq_len - torch.arange(kind.shape[1]) * tile, max=tile)
    cols = torch.clamp(seq_len - torch.arange(kind.shape[2]) * tile, max=tile)
    area = rows[:, None] * cols[None, :]  # [nQ, nK]
    return float(((kind != 0) * area[None]).sum()) / (kind.shape[0] * seq_len * seq_len)


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (allocations, first-call overhead)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_masks(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every requested mask; rows hold times relative to dense causal and work fractions."""
    from longreach.kernels.api import get_backend
    from longreach.kernels import masks as M

    torch.manual_seed(0)
    s, h, d, b = args.seq_len, args.heads, args.head_dim, args.batch
    dtype = getattr(torch, args.dtype)
    q = torch.randn(b, s, h, d, dtype=dtype)  # [B, S, H, D]
    k = torch.randn(b, s, max(1, h // args.gqa), d, dtype=dtype)  # [B, S, Hkv, D]
    v = torch.randn_like(k)
    dense, sparse = get_backend("cpu"), get_backend(args.backend)
    tile = getattr(sparse, "TILE_Q", 128)

    def step(backend, mask):
        def go():
            out, lse = backend.forward(q, k, v, mask=mask, scale=None)
            if args.backward:
                backend.backward(torch.ones_like(out), q, k, v, out, lse, mask=mask, scale=None)
        return go

    t_causal = _time(step(dense, M.causal()), args.repeats)
    causal_density = (s + 1) / (2 * s)
    rows = [{"mask": "causal (cpu, dense)", "density": causal_density, "computed": causal_density,
             "seconds": t_causal, "rel_time": 1.0, "rel_work": 1.0}]
    for name in args.masks:
        mask = build_mask(name, s, window=args.window, block=args.block, seed=0)
        dens = mask_density(mask, s, h)
        comp = computed_fraction(mask, s, h, tile)
        t = _time(step(sparse, mask), args.repeats)
        rows.append({"mask": name, "density": dens, "computed": comp, "seconds": t, "rel_time": t / t_causal,
                     "rel_work": comp / causal_density})
        print(f"  {name:<16} density {dens:6.3f}  time {t:7.3f}s", file=sys.stderr, flush=True)
    return rows


def cp_worker(rank: int, world_size: int, seq_len: int, heads: int, head_dim: int, window: int,
              layout: str = "contiguous") -> dict[str, int]:
    """One rank of the ring CP comparison: bytes sent with full causal vs a sliding window."""
    from longreach.kernels import masks as M
    from longreach.parallel import CommRecorder, cp_attention, shard_sequence

    torch.manual_seed(0)
    x = torch.randn(1, seq_len, heads, head_dim)  # [B, S, H, D] same on every rank
    local = shard_sequence(x, layout=layout)
    result = {}
    for label, mask in (("causal", None), ("sliding_window", M.sliding_window(window))):
        with CommRecorder() as rec:
            cp_attention(local, local, local, strategy="ring", layout=layout, mask=mask, backend="cpu")
        result[label] = rec.bytes_sent()
    return result


def run_cp(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn ``--cp-ranks`` ranks; per-rank bytes sent by ring attention, sliding window vs causal."""
    try:
        importlib.import_module("longreach.parallel").cp_attention  # noqa: B018
    except (ImportError, AttributeError) as e:
        return {"skipped": f"longreach.parallel.cp_attention unavailable ({e})"}
    from longreach.testing import run_ranks

    s = args.cp_seq_len
    res = run_ranks(cp_worker, args.cp_ranks, args=(s, args.heads, args.head_dim, args.cp_window, args.cp_layout))
    return {"seq_len": s, "window": args.cp_window, "ranks": args.cp_ranks, "layout": args.cp_layout,
            "bytes_causal": [r["causal"] for r in res], "bytes_window": [r["sliding_window"] for r in res]}


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'mask':<22}{'density':>9}{'computed':>10}{'work/causal':>13}{'time/causal':>13}{'seconds':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mask']:<22}{r['density']:>9.3f}{r['computed']:>10.3f}{r['rel_work']:>13.3f}"
                     f"{r['rel_time']:>13.3f}{r['seconds']:>10.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("masks", "lightning"), default="masks",
                   help="masks (default) or lightning (delegates to longreach.bench.lightning)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens (default 8192)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gqa", type=int, default=1, help="query heads per K/V head")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32")
    p.add_argument("--masks", default=",".join(MASK_NAMES[1:]), help="comma-separated subset of: " + ", ".join(MASK_NAMES))
    p.add_argument("--backend", default="cpu_sparse", help="sparse backend to time (default cpu_sparse)")
    p.add_argument("--window", type=int, default=1024, help="sliding window (tokens)")
    p.add_argument("--block", type=int, default=128, help="power / ssa block (tokens)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--cp", action="store_true", help="also count ring CP bytes (2 gloo ranks)")
    p.add_argument("--cp-seq-len", type=int, default=4096)
    p.add_argument("--cp-ranks", type=int, default=4, help="gloo ranks for --cp (default 4)")
    p.add_argument("--cp-layout", default="contiguous", help="sequence layout for --cp (default contiguous)")
    p.add_argument("--cp-window", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", default=None, help="write the results here")
    # the lightning suite's own options (--lightning-*, --lasp-*)
    importlib.import_module("longreach.bench.lightning").add_arguments(p)
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``longreach bench kernels``."""
    args = build_parser().parse_args(argv)
    if args.suite == "lightning":
        try:
            mod = importlib.import_module("longreach.bench.lightning")
        except ModuleNotFoundError as e:
            raise UserError("bench kernels --suite lightning: longreach.bench.lightning is not installed") from e
        return int(mod.run(args) or 0)
    args.masks = [m.strip() for m in args.masks.split(",") if m.strip()]
    for m in args.masks:
        if m not in MASK_NAMES:
            raise UserError(f"bench kernels --masks: unknown mask {m!r}; choose from {', '.join(MASK_NAMES)}")
    if args.seq_len < 1 or args.heads < 1 or args.head_dim < 1 or args.gqa < 1 or args.heads % args.gqa:
        raise UserError("bench kernels: --seq-len, --heads, --head-dim must be >= 1 and --heads divisible by --gqa")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench kernels: S={args.seq_len} B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} "
          f"{args.backend} vs dense causal cpu, {'fwd+bwd' if args.backward else 'fwd'}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = run_masks(args)
    print(_table(rows))
    print("density: allowed pairs / S^2; computed: score elements in non-empty tiles / S^2; "
          "work/causal and time/causal: relative to the dense causal kernel (FLOPs skipped = 1 - work/causal)")
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()}, "masks": rows}
    if args.cp:
        cp = run_cp(args)
        result["cp"] = cp
        if "skipped" in cp:
            print(f"ring CP: skipped: {cp['skipped']}")
        else:
            for r, (bc, bw) in enumerate(zip(cp["bytes_causal"], cp["bytes_window"])):
                print(f"ring CP S={cp['seq_len']} window={cp['window']} {cp['layout']} rank {r}: bytes sent causal {bc}, "
                      f"sliding window {bw} ({bw / bc if bc else float('nan'):.3f} of causal)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
