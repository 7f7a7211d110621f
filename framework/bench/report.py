"""``longreach report RESULTS… --out DIR``: ``report.md`` with tables and PNG plots from sweep results.

Reads one or more ``results.jsonl`` files written by ``longreach bench sweep`` (records with
``kind: "sweep_point"``; other lines are ignored) and writes into ``DIR``:

* ``report.md`` — where the numbers came from (hardware, software, conventions), a table of every
  point (times with spread, tokens/s, TFLOP/s, MFU, peak memory, bytes sent and work balance per
  rank), strong and weak scaling efficiency tables, a strategy comparison and the skipped points;
* ``throughput_vs_seqlen.png``, ``memory_vs_seqlen.png``, ``throughput_vs_world.png``,
  ``memory_vs_world.png``, ``strong_scaling.png``, ``weak_scaling.png``, ``strategy_comparison.png``
  (matplotlib, Agg backend: no display needed), linked from the report.

Scaling definitions (forward+backward median times ``t``):

* strong scaling at a fixed sequence length S: ``E(P) = t(1, S) / (P · t(P, S))``;
* weak scaling at fixed tokens per rank n (``S = n·P``): attention work grows as S², so the
  efficiency is FLOP-normalised, ``E(P) = (FLOP/s per rank at P, S = n·P) / (FLOP/s at 1, S = n)``;
  the plain time ratio ``t(1, n) / t(P, n·P)`` is listed beside it.

    longreach report results.jsonl --out report/
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from longreach.errors import UserError

__all__ = ["load_results", "main", "write_report"]

SETUP_KEYS = ("heads", "kv_heads", "head_dim", "dtype", "batch", "device")


def load_results(paths: Iterable[str | Path]) -> list[dict]:
    """Every ``sweep_point`` record of the given JSON-lines files.

    Raises:
        UserError: a missing file, a line that is not JSON (file:line), or no sweep records at all.
    """
    records: list[dict] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UserError(f"report: results file not found: {path}")
        with open(path) as fh:
            for i, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"report: {path}:{i} is not a JSON line ({e.msg})") from None
                if isinstance(rec, dict) and rec.get("kind") == "sweep_point":
                    records.append(rec)
    if not records:
        raise UserError(f"report: no 'longreach bench sweep' records in {', '.join(map(str, paths))}")
    return records


def _setup(rec: dict) -> tuple:
    c = rec["config"]
    hw = rec.get("hardware", {})
    return tuple(c.get(k) for k in SETUP_KEYS) + (hw.get("gpu_name") or hw.get("cpu_model"),)


def _series_key(rec: dict) -> tuple:
    c = rec["config"]
    return (c["backend"], c["mask"], c["strategy"], c["layout"], c.get("ulysses_degree"), _setup(rec))


def _label(key: tuple, varying: set[int], world: int | None = None) -> str:
    backend, mask, strategy, layout, u, setup = key
    parts = []
    if world is not None:
        parts.append(f"P={world}")
    if strategy == "none":
        parts.append("1 rank")
    else:
        parts.append(strategy + (f"(U={u})" if u else "") + f"/{layout}")
    if 0 in varying:
        parts.append(backend)
    if 1 in varying:
        parts.append(mask)
    if 5 in varying:
        parts.append("H{}/{} D{} {}".format(*setup[:4]))
    return " ".join(parts)


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "–"


def _mib(v: Any) -> str:
    return f"{v / 2**20:.2f}" if isinstance(v, (int, float)) else "–"


def _dedupe(ok: list[dict]) -> list[dict]:
    """The latest record per (series, world, seq_len) (results files are appended to)."""
    latest: dict[tuple, dict] = {}
    for r in ok:
        latest[(_series_key(r), r["config"]["world"], r["config"]["seq_len"])] = r
    return list(latest.values())


def _plot_lines(path: Path, series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str, title: str,
                logx: bool = True, logy: bool = True, hline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, pts in sorted(series.items()):
        pts = sorted(pts)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bars(path: Path, groups: list[str], bars: dict[str, list[float | None]], *, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    n = max(1, len(bars))
    width = 0.8 / n
    for i, (label, vals) in enumerate(sorted(bars.items())):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width=width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if bars:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[dict], out_dir: str | Path, *, sources: list[str] | None = None) -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = _dedupe([r for r in records if r.get("status") == "ok"])
    not_ok = [r for r in records if r.get("status") != "ok"]
    keys = sorted({_series_key(r) for r in ok}, key=str)
    varying = {i for i in range(6) if len({k[i] for k in keys}) > 1}
    by_series: dict[tuple, dict[tuple[int, int], dict]] = defaultdict(dict)
    for r in ok:
        by_series[_series_key(r)][(r["config"]["world"], r["config"]["seq_len"])] = r
    worlds = sorted({r["config"]["world"] for r in ok})
    seqs = sorted({r["config"]["seq_len"] for r in ok})
    plots: list[tuple[str, str]] = []

    # -- throughput and memory against sequence length (one line per series and world size)
    thr: dict[str, list] = defaultdict(list)
    mem: dict[str, list] = defaultdict(list)
    for key, pts in by_series.items():
        for (w, s), r in pts.items():
            lab = _label(key, varying, w)
            thr[lab].append((s, r["tokens_per_s"]))
            if r.get("memory", {}).get("peak_bytes_max"):
                mem[lab].append((s, r["memory"]["peak_bytes_max"] / 2**20))
    _plot_lines(out / "throughput_vs_seqlen.png", thr, xlabel="sequence length (tokens)",
                ylabel="tokens/s (forward+backward)", title="Throughput against sequence length")
    plots.append(("throughput_vs_seqlen.png", "Throughput (forward+backward tokens/s) against sequence length"))
    _plot_lines(out / "memory_vs_seqlen.png", mem, xlabel="sequence length (tokens)", ylabel="peak MiB per rank",
                title="Peak memory per rank against sequence length")
    plots.append(("memory_vs_seqlen.png", "Peak memory per rank against sequence length"))

    # -- against world size (one line per series and sequence length; 1-rank points join every strategy)
    thr_w: dict[str, list] = defaultdict(list)
    mem_w: dict[str, list] = defaultdict(list)
    base = {k: v for k, v in by_series.items() if k[2] == "none"}

    def baseline(key: tuple, s: int) -> dict | None:
        for bk, pts in base.items():
            if bk[0] == key[0] and bk[1] == key[1] and bk[5] == key[5] and (1, s) in pts:
                return pts[(1, s)]
        return None

    for key, pts in by_series.items():
        if key[2] == "none":
            continue
        for s in seqs:
            row = [(w, r) for (w, ss), r in pts.items() if ss == s]
            b = baseline(key, s)
            if b is not None:
                row.append((1, b))
            if len(row) < 2:
                continue
            lab = f"{_label(key, varying)} S={s}"
            thr_w[lab] = [(w, r["tokens_per_s"]) for w, r in row]
            mem_w[lab] = [(w, r["memory"]["peak_bytes_max"] / 2**20) for w, r in row
                          if r.get("memory", {}).get("peak_bytes_max")]
    _plot_lines(out / "throughput_vs_world.png", thr_w, xlabel="ranks", ylabel="tokens/s (forward+backward)",
                title="Throughput against world size")
    plots.append(("throughput_vs_world.png", "Throughput against world size (1 rank = single-rank baseline)"))
    _plot_lines(out / "memory_vs_world.png", mem_w, xlabel="ranks", ylabel="peak MiB per rank",
                title="Peak memory per rank against world size")
    plots.append(("memory_vs_world.png", "Peak memory per rank against world size"))

    # -- strong scaling
    strong_rows: list[tuple] = []
    strong: dict[str, list] = defaultdict(list)
    for key, pts in by_series.items():
        if key[2] == "none":
            continue
        for (w, s), r in sorted(pts.items()):
            b = baseline(key, s)
            if b is None or w == 1:
                continue
            eff = b["time_fwd_bwd"]["median"] / (w * r["time_fwd_bwd"]["median"])
            speed = b["time_fwd_bwd"]["median"] / r["time_fwd_bwd"]["median"]
            strong_rows.append((_label(key, varying), s, w, speed, eff))
            strong[f"{_label(key, varying)} S={s}"].append((w, eff))
            strong[f"{_label(key, varying)} S={s}"].append((1, 1.0))
    _plot_lines(out / "strong_scaling.png", strong, xlabel="ranks", ylabel="efficiency t1 / (P·tP)",
                title="Strong scaling efficiency (fixed sequence length)", logy=False, hline=1.0)
    plots.append(("strong_scaling.png", "Strong scaling efficiency at fixed sequence length"))

    # -- weak scaling (fixed tokens per rank)
    weak_rows: list[tuple] = []
    weak: dict[str, list] = defaultdict(list)
    for key, pts in by_series.items():
        if key[2] == "none":
            continue
        for (w, s), r in sorted(pts.items()):
            if w == 1 or s % w:
                continue
            b = baseline(key, s // w)
            if b is None:
                continue
            per_rank_p = r["flops_fwd_bwd"] / r["time_fwd_bwd"]["median"] / w
            per_rank_1 = b["flops_fwd_bwd"] / b["time_fwd_bwd"]["median"]
            eff = per_rank_p / per_rank_1
            ratio = b["time_fwd_bwd"]["median"] / r["time_fwd_bwd"]["median"]
            weak_rows.append((_label(key, varying), s // w, w, s, eff, ratio))
            lab = f"{_label(key, varying)} n={s // w}/rank"
            weak[lab].append((w, eff))
            weak[lab].append((1, 1.0))
    _plot_lines(out / "weak_scaling.png", weak, xlabel="ranks", ylabel="FLOP/s per rank vs 1 rank",
                title="Weak scaling efficiency (fixed tokens per rank, FLOP-normalised)", logy=False, hline=1.0)
    plots.append(("weak_scaling.png", "Weak scaling efficiency at fixed tokens per rank (FLOP-normalised)"))

    # -- strategy comparison at the largest world size
    wmax = max((w for w in worlds if w > 1), default=worlds[0] if worlds else 1)
    comp: dict[str, list[float | None]] = {}
    comp_rows: list[dict] = []
    for key, pts in by_series.items():
        vals = []
        for s in seqs:
            r = pts.get((wmax, s))
            vals.append(r["time_fwd_bwd"]["median"] * 1e3 if r else None)
            if r:
                comp_rows.append({"label": _label(key, varying), "seq_len": s, "r": r})
        if any(v is not None for v in vals):
            comp[_label(key, varying)] = vals
    _plot_bars(out / "strategy_comparison.png", [str(s) for s in seqs], comp,
               ylabel="forward+backward ms (median)", title=f"Strategies at P={wmax} by sequence length")
    plots.append(("strategy_comparison.png", f"Strategy comparison: forward+backward time at P={wmax}"))

    # -- the markdown
    L: list[str] = ["# longreach scaling report", ""]
    if sources:
        L += [f"Results: {', '.join(f'`{s}`' for s in sources)} — {len(records)} records, {len(ok)} measured "
              f"points (latest per configuration), {len(not_ok)} skipped or failed.", ""]
    L += ["## Where the numbers come from", ""]
    envs = {}
    for r in records:
        hw, sw = r.get("hardware", {}), r.get("software", {})
        envs[json.dumps([hw, sw], sort_keys=True, default=str)] = (hw, sw)
    for hw, sw in envs.values():
        gpu = f", GPU {hw.get('gpu_name')} ×{hw.get('gpu_count')}" if hw.get("gpu_name") else ", no GPU"
        L.append(f"- Hardware: CPU {hw.get('cpu_model')} ({hw.get('cpu_cores')} cores){gpu}; "
                 f"{hw.get('torch_threads_per_rank', '?')} torch thread(s) per rank. Software: python {sw.get('python')}, "
                 f"torch {sw.get('torch')}, longreach {sw.get('longreach')}, triton {sw.get('triton')}.")
    setups = sorted({_setup(r) for r in ok}, key=str)
    for st in setups:
        L.append(f"- Attention shape: B={st[4]} H={st[0]} Hkv={st[1]} D={st[2]} {st[3]} on {st[5]}.")
    L += ["- Times: median over repeats of the slowest rank's time per repeat (after a barrier); spread = "
          "(max − min)/median. Attention FLOPs: forward 4·B·S²·H·D·density, backward 2.5 × forward "
          "(forward+backward = 3.5 ×). MFU only where the device's peak is known (GPUs).",
          "- Peak memory: CUDA max allocated on GPU; on CPU the peak of live tensor bytes allocated during one "
          "forward+backward (inputs excluded). Bytes: sent per rank by the strategy's collectives (CommRecorder). "
          "Balance: attention score elements computed per rank, max/mean (1.00 = balanced).", ""]
    L += ["## Plots", ""]
    for fname, caption in plots:
        L += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    L += ["## All measured points", "",
          "| P | series | S | fwd ms | spread | fwd+bwd ms | spread | tokens/s | TFLOP/s | MFU | peak MiB/rank | "
          "fwd MiB sent/rank | bwd MiB sent/rank | work max/mean |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(ok, key=lambda r: (r["config"]["world"], str(_series_key(r)), r["config"]["seq_len"])):
        c = r["config"]
        L.append(
            f"| {c['world']} | {_label(_series_key(r), varying)} | {c['seq_len']} | "
            f"{1e3 * r['time_fwd']['median']:.1f} | {r['time_fwd']['spread']:.0%} | "
            f"{1e3 * r['time_fwd_bwd']['median']:.1f} | {r['time_fwd_bwd']['spread']:.0%} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops_fwd_bwd']:.4g} | {_fmt(r.get('mfu_fwd_bwd'), '.1%')} | {_mib(r['memory'].get('peak_bytes_max'))} | "
            f"{_mib(r['comm']['fwd_bytes_max'])} | {_mib(r['comm']['bwd_bytes_max'])} | "
            f"{_fmt(r['balance'].get('work_max_over_mean'), '.2f')} |")
    L += ["", "## Strong scaling (fixed sequence length)", "",
          "| series | S | P | speed-up over 1 rank | efficiency |", "|---|---:|---:|---:|---:|"]
    L += [f"| {lab} | {s} | {w} | {sp:.2f}× | {e:.0%} |" for lab, s, w, sp, e in sorted(strong_rows)]
    if not strong_rows:
        L.append("| (no single-rank baseline in these results) | | | | |")
    L += ["", "## Weak scaling (fixed tokens per rank)", "",
          "| series | tokens/rank | P | S | FLOP-normalised efficiency | t(1)/t(P) |", "|---|---:|---:|---:|---:|---:|"]
    L += [f"| {lab} | {n} | {w} | {s} | {e:.0%} | {ratio:.2f} |" for lab, n, w, s, e, ratio in sorted(weak_rows)]
    if not weak_rows:
        L.append("| (no matching single-rank points) | | | | | |")
    L += ["", f"## Strategy comparison (P={wmax})", "",
          "| series | S | fwd+bwd ms | tokens/s | fwd MiB sent/rank | work max/mean | peak MiB/rank |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(comp_rows, key=lambda x: (x["seq_len"], x["r"]["time_fwd_bwd"]["median"])):
        r = row["r"]
        L.append(f"| {row['label']} | {row['seq_len']} | {1e3 * r['time_fwd_bwd']['median']:.1f} | "
                 f"{r['tokens_per_s']:,.0f} | {_mib(r['comm']['fwd_bytes_max'])} | "
                 f"{_fmt(r['balance'].get('work_max_over_mean'), '.2f')} | {_mib(r['memory'].get('peak_bytes_max'))} |")
    if not_ok:
        L += ["", "## Skipped or failed points", "", "| P | strategy | layout | mask | S | status | reason |",
              "|---:|---|---|---|---:|---|---|"]
        for r in not_ok:
            c = r["config"]
            reason = str(r.get("reason", "")).replace("|", "\\|").replace("\n", " ")
            L.append(f"| {c['world']} | {c['strategy']} | {c['layout']} | {c['mask']} | {c['seq_len']} | "
                     f"{r.get('status')} | {reason} |")
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``longreach report``."""
    p = argparse.ArgumentParser(prog="longreach report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.jsonl files from `longreach bench sweep`")
    p.add_argument("--out", required=True, help="folder for report.md and the PNG plots")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    records = load_results(args.results)
    path = write_report(records, args.out, sources=args.results)
    print(f"wrote {path} ({sum(r.get('status') == 'ok' for r in records)} measured points)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
