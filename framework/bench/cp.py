"""``longreach bench cp``: bytes, work balance and time of every context-parallel strategy × layout.

For each world size it spawns gloo ranks once (``longreach.testing.run_ranks``) and runs every
strategy × layout on the same seeded full sequence. Per (world size, strategy, layout) it prints:

* forward bytes sent per rank (max over ranks) against the strategy's theoretical minimum (ring
  (P−1) × local K/V bytes; Ulysses (P−1)/P of the local q, k, v, out bytes, replicated K/V
  heads counted once per replica; hybrid the sum of its Ulysses and ring parts; all-gather
  (P−1) × local K/V bytes), and the mean over ranks;
* attention work max/mean across ranks — the causal load balance: score elements the local kernels
  were called on ("work"; a masked block counts whole) and score elements the mask allows in them
  ("allowed");
* forward (and with ``--backward`` backward) wall time, max over ranks (CPU gloo: indicative only);
* DeepSpeed's Ulysses ``DistributedAttention`` on the same shapes, where it runs.

    longreach bench cp --world-sizes 2,4 --seq-len 1024 --json cp.json

``--peers`` runs longreach side by side with peer implementations instead: ring zigzag against
ring-flash-attn's zigzag ring (bf16) and yunchang's, Ulysses against DeepSpeed's Ulysses (fp32),
hybrid (U = 2) against yunchang's USP (bf16), causal, forward + backward, on identical inputs
(:mod:`longreach.bench.cp_peers` runs the ranks). Rounds are interleaved (the first to run alternates),
each pass timed as its slowest rank; per pair it prints the median time of each side, the median and
spread of the per-round ratio longreach ÷ peer, kernel calls and aten calls per pass, and errors
against the float64 reference (max and L2). ring-flash-attn and yunchang need flash-attn: a checkout's
``tests/peers`` holds a CPU stand-in for the flash-attn functions they call (the same aten CPU flash
kernel longreach calls), put on the ranks' path when found; a peer that does not import is skipped
with a printed line saying why. ``--split`` runs as many rounds again with the flash kernel timed
alone (a dispatch mode around it, which slows every other aten call, so those passes are not the timed
ones) and splits each side's pass into kernel ms (rank 0's median) and the rest, outside the kernel:
what the context-parallel layer costs (communication, copies, merges and waits).

    longreach bench cp --peers --world-sizes 2,4 --seq-lens 2048,8192 --rounds 7 [--split]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from longreach.bench.cp_peers import PEER_PAIRS, peers_worker
from longreach.bench.cp_ranks import bench_worker
from longreach.errors import UserError
from longreach.parallel.config import LAYOUTS, STRATEGIES
from longreach.testing import run_ranks


def _csv(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise UserError(f"--{what}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    if not items:
        raise UserError(f"--{what} is empty")
    return items


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach bench cp", description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", default="2,4", help="comma-separated rank counts (default 2,4)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--seq-len", type=int, default=1024, help="global sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--ulysses-degree", type=int, default=None, help="hybrid: ranks per Ulysses group (default 2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    p.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    p.add_argument("--backward", action="store_true", help="also time and count the backward pass")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-deepspeed", dest="deepspeed", action="store_false",
                   help="skip DeepSpeed's DistributedAttention comparison")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the per-row results here")
    p.add_argument("--peers", action="store_true",
                   help="compare with peer implementations (ring-flash-attn, yunchang, DeepSpeed Ulysses)")
    p.add_argument("--seq-lens", default="2048,8192", help="--peers: comma-separated global sequence lengths")
    p.add_argument("--rounds", type=int, default=7, help="--peers: interleaved timing rounds (default 7)")
    p.add_argument("--pairs", default=None,
                   help="--peers: comma-separated words; only the pairs whose name holds one of them run "
                        "(e.g. 'ulysses' or 'DeepSpeed Ulysses bf16'; default: every pair)")
    p.add_argument("--split", action="store_true",
                   help="--peers: as many rounds again, timing the flash kernel alone; adds kernel ms and the ms "
                        "outside the kernel (the context-parallel layer: communication, copies, merges, waits) "
                        "per side")
    p.add_argument("--peers-path", default=None,
                   help="--peers: folder with the flash-attn CPU stand-in (default: the checkout's tests/peers)")
    return p


def peers_path(explicit: str | None) -> str | None:
    """The folder of the flash-attn CPU stand-in: ``explicit``, else ``tests/peers`` of the checkout this
    module runs from or of the working directory; None when there is none."""
    if explicit:
        path = Path(explicit)
        if not (path / "flash_attn").is_dir():
            raise UserError(f"--peers-path {explicit}: no flash_attn stand-in folder there")
        return str(path.resolve())
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        path = root / "tests" / "peers"
        if (path / "flash_attn").is_dir():
            return str(path)
    return None


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics x(k) and x(n+1-k) with the
    largest k whose binomial coverage 1 - 2·P(Bin(n, 1/2) < k) is still at least ``level`` (n = 9: x(2)..x(8),
    96%; n = 7: x(1)..x(7), 98%). Fewer than 6 values cannot reach 95%: the whole range then."""
    xs, n = sorted(values), len(values)

    def coverage(k: int) -> float:  # of [x(k), x(n+1-k)]: 1 - 2·P(Bin(n, 1/2) < k)
        return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2 ** n

    k = 1
    while k < (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k]


def verdict(lo: float, hi: float) -> str:
    """``faster`` / ``slower`` when the ratio's interval lies below / above 1, else ``parity``."""
    return "faster" if hi < 1 else "slower" if lo > 1 else "parity"


def summarize_peers(records: list[dict]) -> list[dict]:
    """Per (pair, world, seq_len): median times, ratio median / min / max over rounds with the 95% interval of
    the median and its verdict, calls, errors."""
    rows = []
    for r in records:
        if r["rank"] != 0:
            continue
        row = {k: r[k] for k in ("pair", "world", "seq_len")}
        if "error" in r:
            row["error"] = r["error"]
            rows.append(row)
            continue
        ratios = [a / b for a, b in zip(r["ours_s"], r["peer_s"])]
        row.update(ours_ms=1e3 * statistics.median(r["ours_s"]), peer_ms=1e3 * statistics.median(r["peer_s"]),
                   ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                   rounds=len(ratios))
        row["ratio_lo"], row["ratio_hi"] = median_interval(ratios)
        row["verdict"] = verdict(row["ratio_lo"], row["ratio_hi"])
        if "ours_cpu_s" in r:
            cpu = [a / b for a, b in zip(r["ours_cpu_s"], r["peer_cpu_s"])]
            row.update(cpu_ratio=statistics.median(cpu), cpu_ratio_min=min(cpu), cpu_ratio_max=max(cpu))
        for k in ("dtype", "kernel_calls", "aten_calls", "out_err", "grad_err", "out_l2", "grad_l2"):
            if f"ours_{k}" in r:
                row[f"ours_{k}"], row[f"peer_{k}"] = r[f"ours_{k}"], r[f"peer_{k}"]
        if "ours_faults" in r:  # rank 0's minor page faults per pass
            row["ours_faults"] = statistics.median(r["ours_faults"])
            row["peer_faults"] = statistics.median(r["peer_faults"])
        if "ours_kernel_s" in r:  # rank 0's kernel time per pass; outside = the pass's median less it
            for side in ("ours", "peer"):
                row[f"{side}_kernel_ms"] = 1e3 * statistics.median(r[f"{side}_kernel_s"])
                row[f"{side}_outside_ms"] = row[f"{side}_ms"] - row[f"{side}_kernel_ms"]
            row["kernel_ratio"] = statistics.median(a / b for a, b in zip(r["ours_kernel_s"], r["peer_kernel_s"]))
        rows.append(row)
    return rows


def skipped_peers(records: list[dict]) -> dict[str, str]:
    """name -> why, for every side that did not run (first reason seen)."""
    out: dict[str, str] = {}
    for r in records:
        for name, why in r.get("skipped", {}).items():
            out.setdefault(name, why)
    return out


def format_peers(rows: list[dict]) -> str:
    head = (f"{'pair':<50} {'P':>2} {'S':>6} {'dtype':<8} {'ours ms':>8} {'peer ms':>8} {'ratio':>6} "
            f"{'(min-max)':>12} {'95% CI':>11} {'verdict':<7} {'cpu ratio':>9} {'(min-max)':>12} {'kernel calls':>12} {'aten calls':>11} {'out err ours/peer':>19} "
            f"{'grad err ours/peer':>19} {'grad L2 ours/peer':>19} {'kernel ms ours/peer':>13} "
            f"{'outside ms ours/peer':>13} {'faults ours/peer':>11}")

    cols = (("pair", "<50"), ("world", ">2"), ("seq_len", ">6"), ("ours_dtype", "<8"), ("ours_ms", ">8.1f"),
            ("peer_ms", ">8.1f"), ("ratio", ">6.2f"))
    sides = (("kernel_calls", ">5", "<6"), ("aten_calls", ">5", "<5"), ("out_err", ">9.1e", "<9.1e"),
             ("grad_err", ">9.1e", "<9.1e"), ("grad_l2", ">9.1e", "<9.1e"), ("kernel_ms", ">6.1f", "<6.1f"),
             ("outside_ms", ">6.1f", "<6.1f"), ("faults", ">5.0f", "<5.0f"))

    def both(r: dict, k: str, a: str, b: str) -> str:
        if f"ours_{k}" not in r:
            return f"{'-/-':>11}"
        return f"{format(r['ours_' + k], a)}/{format(r['peer_' + k], b)}"

    def line(r: dict) -> str:
        spread = (f"{r['ratio_min']:>5.2f}-{r['ratio_max']:<6.2f} {r['ratio_lo']:>5.2f}-{r['ratio_hi']:<5.2f} "
                  f"{r['verdict']:<7}")
        cpu = (f"{r['cpu_ratio']:>9.2f} {r['cpu_ratio_min']:>5.2f}-{r['cpu_ratio_max']:<6.2f}" if "cpu_ratio" in r
               else f"{'-':>9} {'':12}")
        return " ".join([*(format(r[k], f) for k, f in cols), spread, cpu, *(both(r, *s) for s in sides)])

    return _lines(head, rows, lambda r: f"{r['pair']:<50} {r['world']:>2} {r['seq_len']:>6}", line)


def select_pairs(words: str | None) -> list[tuple[str, str]]:
    """The (longreach, peer) pairs of :data:`PEER_PAIRS` whose row name holds one of the comma-separated
    ``words`` (case-insensitive; None: all)."""
    if words is None:
        return list(PEER_PAIRS)
    wanted = [w.strip().lower() for w in words.split(",") if w.strip()]
    chosen = [p for p in PEER_PAIRS if any(w in f"{p[0]} ÷ {p[1]}".lower() for w in wanted)]
    if not chosen:
        names = "; ".join(f"{a} ÷ {b}" for a, b in PEER_PAIRS)
        raise UserError(f"--pairs {words!r} matches no pair; the pairs are: {names}")
    return chosen


def _main_peers(args: argparse.Namespace, worlds: list[int]) -> int:
    seq_lens = [int(x) for x in _csv(args.seq_lens, None, "seq-lens")]
    if args.rounds < 1:
        raise UserError("--rounds must be >= 1")
    for w in worlds:
        bad = [s for s in seq_lens if s % (2 * w) or (s // w) % 2]
        if bad or args.heads % w:
            raise UserError(f"--seq-lens must divide by 2·P and --heads ({args.heads}) by P for every world size; "
                            f"P={w} fails")
    pairs = select_pairs(args.pairs)
    path = peers_path(args.peers_path)
    print("flash-attn CPU stand-in: " + (path if path else "not found (run from a checkout with tests/peers); "
                                          "ring-flash-attn and yunchang will not run"))
    cfg = {"seq_lens": seq_lens, "rounds": args.rounds, "heads": args.heads, "head_dim": args.head_dim,
           "seed": args.seed, "peers_path": path, "pairs": pairs, "split": args.split}
    records = _run(peers_worker, worlds, cfg, args.threads, 3600)
    rows = summarize_peers(records)
    for name, why in skipped_peers(records).items():
        print(f"skipped {name}: {why}")
    for heap in sorted({r["heap"] for r in records if "heap" in r}):
        print(f"allocator: {heap}")
    _emit(f"longreach bench cp --peers — B=1 H={args.heads} D={args.head_dim} causal, forward + backward; "
          f"gloo on CPU, {args.threads} thread(s)/rank; ratio = longreach ÷ peer per round "
          f"(median of {args.rounds}, interleaved; wall clock of the slowest rank, and CPU clock of all ranks); "
          f"95% CI: distribution-free interval of the wall-clock median, verdict faster/slower only when it "
          f"excludes 1; calls and page faults are per pass on rank 0",
          format_peers(rows), args.json, {"config": cfg, "worlds": worlds, "rows": rows, "records": records})
    return 0


def summarize(records: list[dict]) -> list[dict]:
    """Per (world, strategy, layout): bytes max/mean over ranks vs minimum, work max/mean, times."""
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        rows.setdefault((r["world"], r["strategy"], r["layout"]), []).append(r)
    out = []
    for (world, strategy, layout), rs in rows.items():
        row: dict = {"world": world, "strategy": strategy, "layout": layout,
                     "ulysses_degree": rs[0].get("ulysses_degree")}
        errs = [r["error"] for r in rs if "error" in r]
        if errs:
            row["error"] = errs[0]
            out.append(row)
            continue
        sent = [r["fwd_sent"] for r in rs]
        row["fwd_bytes_max"], row["fwd_bytes_mean"] = max(sent), statistics.mean(sent)
        mins = [r.get("min_fwd") for r in rs]
        if all(m for m in mins):
            row["min_bytes"] = max(mins)
            row["ratio_max"] = max(s / m for s, m in zip(sent, mins))
            row["ratio_mean"] = statistics.mean(s / m for s, m in zip(sent, mins))
        if "work_fwd" in rs[0]:
            work = [r["work_fwd"] for r in rs]
            row["work_max_over_mean"] = max(work) / statistics.mean(work) if statistics.mean(work) else None
            row["work_total"] = sum(work)
            allowed = [r.get("allowed_fwd", 0) for r in rs]
            if statistics.mean(allowed):
                row["allowed_max_over_mean"] = max(allowed) / statistics.mean(allowed)
        row["time_fwd_ms"] = 1e3 * max(r["time_fwd"] for r in rs)
        if "time_bwd" in rs[0]:
            row["time_bwd_ms"] = 1e3 * max(r["time_bwd"] for r in rs)
            row["bwd_bytes_max"] = max(r["bwd_sent"] for r in rs)
            bw = [r["work_bwd"] for r in rs]
            row["bwd_work_max_over_mean"] = max(bw) / statistics.mean(bw) if statistics.mean(bw) else None
        row["calls"] = rs[0].get("fwd_calls", {})
        out.append(row)
    return out


def _lines(head: str, rows: list[dict], key, line) -> str:
    """A table: ``head``, a rule, then ``line(row)`` per row, or ``key(row)`` and why a row did not run."""
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{key(r)} not run: {r['error']}" if "error" in r else line(r))
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    head = (f"{'P':>2} {'strategy':<18} {'layout':<10} {'U':>2} {'fwd B/rank max':>14} {'minimum':>12} "
            f"{'max/min':>7} {'mean/min':>8} {'work max/mean':>13} {'allowed max/mean':>16} {'fwd ms':>8} "
            f"{'bwd ms':>8}")

    def line(r: dict) -> str:
        def f(key, fmt):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        u = r.get("ulysses_degree") or ""
        return (
            f"{r['world']:>2} {r['strategy']:<18} {r['layout']:<10} {u!s:>2} {f('fwd_bytes_max', ',.0f'):>14} "
            f"{f('min_bytes', ',.0f'):>12} {f('ratio_max', '.2f'):>7} {f('ratio_mean', '.2f'):>8} "
            f"{f('work_max_over_mean', '.3f'):>13} {f('allowed_max_over_mean', '.3f'):>16} "
            f"{f('time_fwd_ms', '.1f'):>8} {f('time_bwd_ms', '.1f'):>8}"
        )

    return _lines(head, rows, lambda r: f"{r['world']:>2} {r['strategy']:<18} {r['layout']:<10} {'':>2}", line)


def _run(worker, worlds: list[int], cfg: dict, threads: int, timeout: int) -> list[dict]:
    records: list[dict] = []
    for w in worlds:
        for recs in run_ranks(worker, w, args=(cfg,), timeout=timeout, threads=threads):
            records.extend(recs)
    return records


def _emit(title: str, table: str, path: str | None, payload: dict) -> None:
    print(title)
    print(table)
    if path:
        with open(path, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    worlds = [int(w) for w in _csv(args.world_sizes, None, "world-sizes")]
    if any(w < 1 for w in worlds):
        raise UserError("--world-sizes: every world size must be >= 1")
    if args.peers:
        return _main_peers(args, worlds)
    cfg = {
        "strategies": _csv(args.strategies, STRATEGIES, "strategies"),
        "layouts": _csv(args.layouts, LAYOUTS, "layouts"),
        "seq_len": args.seq_len, "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
        "head_dim": args.head_dim, "ulysses_degree": args.ulysses_degree, "dtype": args.dtype,
        "causal": args.causal, "backward": args.backward, "repeats": max(1, args.repeats),
        "deepspeed": args.deepspeed, "seed": args.seed,
    }
    if args.heads % args.kv_heads != 0:
        raise UserError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    records = _run(bench_worker, worlds, cfg, args.threads, 1800)
    rows = summarize(records)
    shape = (f"B={args.batch} S={args.seq_len} H={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype} "
             f"{'causal' if args.causal else 'full'}; gloo on CPU, {args.threads} thread(s)/rank")
    _emit(f"longreach bench cp — {shape}", format_table(rows), args.json,
          {"config": cfg, "worlds": worlds, "rows": rows, "records": records})
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
