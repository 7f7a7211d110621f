"""``longreach plan``: pick a context-parallel strategy and degrees before spending a cluster day.

For a model shape (``--model llama2_7b`` or ``--layers/--hidden/…``), a hardware profile
(``--hardware h100_sxm|h200|a100_80g|cpu_gloo``), sequence lengths and GPU counts it evaluates every
strategy the model allows — ring (contiguous), zigzag ring, Ulysses, hybrid (Ulysses inside a node ×
ring across nodes), all-gather, LASP-2 for linear-attention models, and plain data parallelism — at
every context-parallel degree that divides the GPUs, with and without activation checkpointing, using
the analytic model of :mod:`longreach.planning.costmodel` (compute from FLOPs and device throughput ×
achievable MFU, communication from bytes and per-level link bandwidths, ring overlap, memory per rank
with ZeRO/FSDP sharding). It prints, per (sequence length, GPUs), the fastest configuration that fits
in memory: strategy, cp × dp degrees, step time, tokens/s, MFU and memory per GPU. Each data-parallel
replica holds one sequence, so the global batch is dp sequences.

Calibration (``--calibrate results.jsonl``) fits the profile's effective attention-kernel FLOP/s, its
backward/forward speed ratio, per-message latency, effective bandwidth, per-call overhead and ring
overlap to measured ``longreach bench sweep`` points by least squares on log time (Levenberg–Marquardt,
numerical Jacobian, a few starts). The points are split in two halves — within each (strategy, layout,
world size, …) series sorted by length, every other point, alternating the phase between series — one
half fits, the other is predicted and its median relative error reported. ``--json FILE`` saves the
fit; ``--calibration FILE`` applies it to a profile before planning.

    longreach plan --model llama2_7b --hardware h100_sxm --seq-len 128k,512k,1M --gpus 64,128,256,512,1024
    longreach plan --calibrate results.jsonl --json calib.json
    longreach plan --hardware cpu_gloo --calibration calib.json --model llama2_7b --seq-len 8k --gpus 2
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
from typing import Any

import numpy as np

from longreach.bench.report import load_results
from longreach.errors import UserError

from .costmodel import MODELS, MemoryOptions, ModelShape, StepCost, attention_cost, attention_flops, step_cost
from .hardware import PROFILES, DeviceProfile, get_profile

__all__ = ["PUBLISHED", "calibrate", "candidates", "main", "parse_tokens", "plan_table", "split_halves"]

# Published figures the planner's output can be set beside (quoted from the papers; not predictions).
PUBLISHED: list[dict[str, str]] = [
    {"system": "USP (hybrid Ulysses×ring)", "setup": "Llama3-8B, 208k tokens, 2×8 A800",
     "figure": "47% MFU", "source": "USP paper (Fang & Zhao 2024)"},
    {"system": "LASP (linear attention SP)", "setup": "TNL-1B-class linear model, 128 A100-80G",
     "figure": "4096K-token sequences trained", "source": "LASP paper (Sun et al. 2024)"},
    {"system": "LASP-2", "setup": "2048K tokens, 64 GPUs", "figure": "15.2% faster than LASP, 36.6% faster than ring attention",
     "source": "LASP-2 paper (Sun et al. 2025)"},
    {"system": "ring-flash-attn", "setup": "8×H800, fwd+bwd, share of flash-attn throughput",
     "figure": "ring 53.9%, zigzag 90.2%, stripe 82.9%", "source": "ring-flash-attention README"},
    {"system": "USP", "setup": "8×L20 PCIe", "figure": "ulysses=2 × ring=4 best", "source": "USP paper"},
]

_SUFFIX = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_tokens(text: str) -> int:
    """``"128k"`` → 131072, ``"1M"`` → 1048576, ``"8192"`` → 8192 (binary suffixes)."""
    t = text.strip().lower()
    try:
        if t and t[-1] in _SUFFIX:
            return int(float(t[:-1]) * _SUFFIX[t[-1]])
        return int(t)
    except ValueError:
        raise UserError(f"plan: cannot read {text!r} as a token count (e.g. 131072, 128k, 1M)") from None


def _int_list(text: str, what: str) -> list[int]:
    vals = [parse_tokens(x) for x in text.split(",") if x.strip()]
    if not vals or any(v < 1 for v in vals):
        raise UserError(f"plan: --{what} needs positive values, got {text!r}")
    return vals


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------
def candidates(model: ModelShape, profile: DeviceProfile, gpus: int, seq_len: int) -> list[tuple[str, str, int, int | None]]:
    """(strategy, layout, cp, ulysses_degree) the model and hardware allow on ``gpus`` devices."""
    out: list[tuple[str, str, int, int | None]] = [("none", "contiguous", 1, None)]
    heads, kv = model.heads, model.kv_heads
    assert kv is not None
    for cp in range(2, gpus + 1):
        if gpus % cp or seq_len % (2 * cp):
            continue
        if model.attention == "linear":
            out.append(("lasp2", "zigzag", cp, None))
            continue
        out += [("ring", "contiguous", cp, None), ("ring", "zigzag", cp, None), ("allgather", "zigzag", cp, None)]
        if heads % cp == 0 and (kv % cp == 0 or cp % kv == 0):
            out.append(("ulysses", "zigzag", cp, None))
        for u in range(2, min(cp, profile.gpus_per_node) + 1):
            if cp % u == 0 and u < cp and heads % u == 0 and (kv % u == 0 or u % kv == 0):
                out.append(("hybrid", "zigzag", cp, u))
    return out


def plan_point_options(model: ModelShape, profile: DeviceProfile, gpus: int, seq_len: int, *, zero: int,
                       strategies: set[str] | None = None) -> list[StepCost]:
    """Every candidate (with and without checkpointing) costed; unsorted."""
    res = []
    for strategy, layout, cp, u in candidates(model, profile, gpus, seq_len):
        label_ok = strategies is None or strategy in strategies or (strategy == "ring" and layout == "zigzag"
                                                                    and "zigzag" in strategies)
        if not label_ok:
            continue
        for opts in MEMORY_MODES:
            res.append(step_cost(model, profile, gpus=gpus, seq_len=seq_len, strategy=strategy, cp=cp, layout=layout,
                                 ulysses_degree=u, checkpointing=opts.checkpointing, zero=zero, memory=opts))
    return res


MEMORY_MODES = (
    MemoryOptions(checkpointing=False),
    MemoryOptions(checkpointing=True),
    MemoryOptions(checkpointing=True, tiled=True),
    MemoryOptions(checkpointing=True, tiled=True, offload=True),
    MemoryOptions(checkpointing=True, tiled=True, offload=True, optimizer_offload=True),
)
"""What the planner tries per strategy, from keeping everything to keeping one hidden state per layer on the
host: the fastest that fits wins (each costs time: recompute, host copies, a host optimizer)."""


def memory_lines(o: StepCost, profile: DeviceProfile) -> list[str]:
    """The memory breakdown of one configuration, and what it offloads where."""
    b = o.breakdown
    gb = 1e9
    phases = {k[len("mem_phase_"):]: v for k, v in b.items() if k.startswith("mem_phase_")}
    peak = max(phases, key=phases.get)  # type: ignore[arg-type]
    lines = [f"memory {o.memory.label}: {b['mem_total'] / gb:.1f} GB per GPU of {profile.memory_bytes / gb:.0f} = "
             f"states {b['mem_states'] / gb:.1f} + kept block inputs {b['mem_checkpoints'] / gb:.1f} + per-model "
             f"tensors and flowing gradients {b['mem_per_model'] / gb:.1f} + largest backward phase ({peak}) "
             f"{phases[peak] / gb:.1f}, ×1.05 + 1.5 GB context"]
    where = []
    if o.memory.checkpointing and o.memory.offload:
        where.append("checkpointed block inputs → pinned host memory (2 blocks in flight on the GPU)")
    if o.memory.optimizer_offload:
        where.append("Adam state (fp32 master, m, v) → host memory, stepped there")
    if where:
        lines.append(f"offloads {b['mem_host'] / gb:.1f} GB per GPU to the host (of {profile.host_memory_bytes / gb:.0f} "
                     f"GB per GPU assumed): " + "; ".join(where))
    if o.memory.tiled:
        lines.append(f"MLP and norms run over {o.memory.tile_tokens}-token tiles, recomputed in backward")
    return lines


def best(options: list[StepCost]) -> StepCost | None:
    """The fastest option that fits (ties: less memory); None when none fits."""
    fit = [o for o in options if o.fits]
    if not fit:
        return None
    return max(fit, key=lambda o: (o.tokens_per_s, -o.memory_bytes))


def plan_table(model: ModelShape, profile: DeviceProfile, seq_lens: list[int], gpus_list: list[int], *, zero: int = 3,
               strategies: set[str] | None = None) -> list[dict[str, Any]]:
    """One row per (seq_len, gpus): the recommended configuration (or why none fits) and the best per strategy."""
    rows = []
    for s in seq_lens:
        for n in gpus_list:
            opts = plan_point_options(model, profile, n, s, zero=zero, strategies=strategies)
            rec = best(opts)
            per_strategy: dict[str, StepCost] = {}
            for o in opts:
                if o.fits and (o.label.split(" U")[0] not in per_strategy
                               or o.tokens_per_s > per_strategy[o.label.split(" U")[0]].tokens_per_s):
                    per_strategy[o.label.split(" U")[0]] = o
            row: dict[str, Any] = {"seq_len": s, "gpus": n, "best": rec, "per_strategy": per_strategy}
            if rec is None and opts:
                row["smallest"] = min(opts, key=lambda o: o.memory_bytes)
            rows.append(row)
    return rows


def _row_dict(o: StepCost) -> dict[str, Any]:
    d = {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
    d["label"] = o.label
    return d


def _print_plan(rows: list[dict], model: ModelShape, profile: DeviceProfile, zero: int, show_all: bool) -> None:
    print(f"longreach plan — {model.name}: {model.layers} layers, hidden {model.hidden}, {model.heads} heads "
          f"({model.kv_heads} kv) × {model.head_dim}, ffn {model.ffn}, vocab {model.vocab}, "
          f"{model.params() / 1e9:.2f}B parameters, {model.attention} attention")
    print(f"hardware {profile.name}: {profile.description}; ZeRO-{zero} over all GPUs; bf16; one sequence per "
          f"data-parallel replica. PREDICTIONS of the analytic model, not measurements.")
    head = (f"{'tokens':>8} {'GPUs':>5} {'strategy':<16} {'cp':>5} {'dp':>5} {'memory':<24} {'step s':>9} "
            f"{'tokens/s':>11} {'MFU':>6} {'GB/GPU':>7}   runner-up")
    print(head)
    print("-" * len(head))
    for row in rows:
        b: StepCost | None = row["best"]
        s = row["seq_len"]
        tok = f"{s // 1024}k" if s % 1024 == 0 else str(s)
        if b is None:
            sm = row.get("smallest")
            extra = f" (smallest: {sm.label} cp={sm.cp} needs {sm.memory_bytes / 1e9:.0f} GB)" if sm else ""
            print(f"{tok:>8} {row['gpus']:>5} no configuration fits in {profile.memory_bytes / 1e9:.0f} GB{extra}")
            for line in memory_lines(sm, profile) if sm else []:
                print(f"{'':>15} {line}")
            continue
        others = sorted((o for k, o in row["per_strategy"].items() if o is not b and k != b.label.split(" U")[0]),
                        key=lambda o: -o.tokens_per_s)
        ru = f"{others[0].label} cp={others[0].cp} {others[0].tokens_per_s:,.0f} tok/s" if others else "-"
        mfu = f"{b.mfu:.0%}" if b.mfu is not None else "-"
        print(f"{tok:>8} {row['gpus']:>5} {b.label:<16} {b.cp:>5} {b.dp:>5} {b.memory.label:<24} "
              f"{b.step_s:>9.2f} {b.tokens_per_s:>11,.0f} {mfu:>6} {b.memory_bytes / 1e9:>7.1f}   {ru}")
        for line in memory_lines(b, profile):
            print(f"{'':>15} {line}")
        if show_all:
            for k, o in sorted(row["per_strategy"].items(), key=lambda kv: -kv[1].tokens_per_s):
                print(f"{'':>15} · {o.label:<16} cp={o.cp:<5} {o.memory.label:<24} "
                      f"{o.step_s:9.2f} s {o.tokens_per_s:11,.0f} tok/s {o.memory_bytes / 1e9:6.1f} GB "
                      f"imbalance {o.breakdown['imbalance']:.2f}")


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
_PARAMS = ("attention_flops", "bwd_efficiency", "latency_intra", "intra_bw", "call_overhead", "overlap", "concurrency")


def _obs_from_records(records: list[dict], statistic: str) -> list[dict]:
    obs = []
    for r in records:
        if r.get("status") != "ok":
            continue
        c = r["config"]
        if c["strategy"] not in ("none", "ring", "ulysses", "hybrid", "allgather", "lasp2"):
            continue
        dtype_bytes = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}.get(c["dtype"], 4)
        obs.append({
            "key": (c["backend"], c["mask"], c["strategy"], c["layout"], c.get("ulysses_degree"), c["world"],
                    c["heads"], c["kv_heads"], c["head_dim"], c["dtype"]),
            "seq_len": c["seq_len"], "world": c["world"], "strategy": c["strategy"], "layout": c["layout"],
            "ulysses_degree": c.get("ulysses_degree"), "batch": c["batch"], "heads": c["heads"],
            "kv_heads": c["kv_heads"], "head_dim": c["head_dim"], "density": r.get("density"),
            "causal": c["mask"] == "causal", "dtype_bytes": dtype_bytes,
            "fwd": r["time_fwd"][statistic], "fwd_bwd": r["time_fwd_bwd"][statistic],
            "bytes_fwd": r.get("comm", {}).get("fwd_bytes_max"),
        })
    return obs


def split_halves(obs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(fit half, held-out half): within each series sorted by length every other point, the phase
    alternating between series so both halves cover short and long sequences."""
    series: dict[tuple, list[dict]] = {}
    for o in obs:
        series.setdefault(o["key"], []).append(o)
    fit, held = [], []
    for i, key in enumerate(sorted(series, key=str)):
        for j, o in enumerate(sorted(series[key], key=lambda o: o["seq_len"])):
            (fit if (i + j) % 2 == 0 else held).append(o)
    return fit, held


def _profile_from(theta: np.ndarray, base: DeviceProfile) -> DeviceProfile:
    v = dict(zip(_PARAMS, theta.tolist()))
    return base.with_calibration({
        "attention_flops": math.exp(v["attention_flops"]),
        "bwd_efficiency": math.exp(v["bwd_efficiency"]),
        "latency_intra": math.exp(v["latency_intra"]),
        "latency_inter": math.exp(v["latency_intra"]),
        "intra_bw": math.exp(v["intra_bw"]),
        "inter_bw": math.exp(v["intra_bw"]),
        "call_overhead": math.exp(v["call_overhead"]),
        "overlap": 1.0 / (1.0 + math.exp(-v["overlap"])),
        "link_efficiency": 1.0,
        "concurrency": math.exp(v["concurrency"]),
    })


def predict(o: dict, profile: DeviceProfile) -> tuple[float, float]:
    """(forward s, forward+backward s) of one observation's attention call under ``profile``."""
    c = attention_cost(strategy=o["strategy"], layout=o["layout"], world=o["world"], seq_len=o["seq_len"],
                       batch=o["batch"], heads=o["heads"], kv_heads=o["kv_heads"], head_dim=o["head_dim"],
                       density=o["density"], causal=o["causal"], dtype_bytes=o["dtype_bytes"], profile=profile,
                       ulysses_degree=o["ulysses_degree"], linear=o["strategy"] == "lasp2")
    return c.fwd_s, c.fwd_s + c.bwd_s


def _residuals(theta: np.ndarray, obs: list[dict], base: DeviceProfile) -> np.ndarray:
    prof = _profile_from(theta, base)
    res = []
    for o in obs:
        f, fb = predict(o, prof)
        res += [math.log(f) - math.log(o["fwd"]), math.log(fb) - math.log(o["fwd_bwd"])]
    return np.asarray(res)


_LO = np.array([math.log(1e6), math.log(0.05), math.log(1e-7), math.log(1e6), math.log(1e-7), -6.0, math.log(0.5)])
_HI = np.array([math.log(1e16), math.log(5.0), math.log(1e-1), math.log(1e12), math.log(1e-1), 6.0, math.log(4096.0)])


def _lm(theta: np.ndarray, obs: list[dict], base: DeviceProfile, iters: int = 80) -> tuple[np.ndarray, float]:
    """Levenberg–Marquardt on the log-time residuals (numerical Jacobian, box-clamped)."""
    lam = 1e-2
    r = _residuals(theta, obs, base)
    cost = float(r @ r)
    for _ in range(iters):
        jac = np.empty((r.size, theta.size))
        for k in range(theta.size):
            step = np.zeros_like(theta)
            step[k] = 1e-4
            jac[:, k] = (_residuals(theta + step, obs, base) - _residuals(theta - step, obs, base)) / 2e-4
        g = jac.T @ r
        a = jac.T @ jac
        improved = False
        for _ in range(12):
            delta = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-9), -g)
            cand = np.clip(theta + delta, _LO, _HI)
            rc = _residuals(cand, obs, base)
            cc = float(rc @ rc)
            if cc < cost:
                theta, r, cost, lam = cand, rc, cc, max(lam / 3, 1e-9)
                improved = True
                break
            lam *= 4
        if not improved or float(np.abs(g).max()) < 1e-9:
            break
    return theta, cost


def _errors(obs: list[dict], prof: DeviceProfile) -> list[dict]:
    out = []
    for o in obs:
        f, fb = predict(o, prof)
        out.append({**{k: o[k] for k in ("strategy", "layout", "world", "seq_len")},
                    "fwd": o["fwd"], "pred_fwd": f, "err_fwd": abs(f - o["fwd"]) / o["fwd"],
                    "fwd_bwd": o["fwd_bwd"], "pred_fwd_bwd": fb, "err_fwd_bwd": abs(fb - o["fwd_bwd"]) / o["fwd_bwd"]})
    return out


def calibrate(records: list[dict], base: DeviceProfile, *, statistic: str = "median") -> dict[str, Any]:
    """Fit ``base``'s kernel FLOP/s, backward ratio, latency, bandwidth, call overhead and overlap on half
    of the measured points; report errors on both halves.

    Returns:
        ``params`` (for :meth:`DeviceProfile.with_calibration`), ``fit``/``held_out`` per-point errors,
        and the median relative errors ``median_err_fit`` / ``median_err_held_out`` (forward and
        forward+backward observations together).
    """
    obs = _obs_from_records(records, statistic)
    if len(obs) < 4:
        raise UserError(f"plan --calibrate: need at least 4 measured points, got {len(obs)}")
    fit, held = split_halves(obs)
    # starting points: the base profile and a few kernel speeds around the single-rank measurements
    single = [o for o in fit if o["world"] == 1 and o["strategy"] != "lasp2"] or fit
    guesses = [attention_flops(batch=o["batch"], seq_len=o["seq_len"], heads=o["heads"], head_dim=o["head_dim"],
                   density=o["density"] or 0.5) / o["fwd"] for o in single]
    f0 = statistics.median(guesses) if guesses else base.kernel_flops
    best_theta, best_cost = None, math.inf
    max_world = max(o["world"] for o in fit)
    for f_scale, lat, ov, conc in itertools.product((0.5, 1.0, 2.0), (1e-5, 1e-3), (-2.0, 2.0),
                                                    (1.0, float(max_world))):
        theta0 = np.array([math.log(f0 * f_scale), math.log(0.5), math.log(lat), math.log(1e9), math.log(1e-3), ov,
                           math.log(conc)])
        theta, cost = _lm(np.clip(theta0, _LO, _HI), fit, base, iters=40)
        if cost < best_cost:
            best_theta, best_cost = theta, cost
    assert best_theta is not None
    best_theta, best_cost = _lm(best_theta, fit, base, iters=80)
    prof = _profile_from(best_theta, base)
    ef, eh = _errors(fit, prof), _errors(held, prof)

    def med(rows: list[dict]) -> float:
        vals = [r["err_fwd"] for r in rows] + [r["err_fwd_bwd"] for r in rows]
        return statistics.median(vals) if vals else float("nan")

    params = {k: getattr(prof, k) for k in ("attention_flops", "bwd_efficiency", "latency_intra", "latency_inter",
                                            "intra_bw", "inter_bw", "call_overhead", "overlap", "link_efficiency",
                                            "concurrency")}
    return {"base_profile": base.name, "statistic": statistic, "params": params, "n_fit": len(fit),
            "n_held_out": len(held), "fit": ef, "held_out": eh, "median_err_fit": med(ef),
            "median_err_held_out": med(eh),
            "median_err_held_out_fwd": statistics.median(r["err_fwd"] for r in eh) if eh else float("nan"),
            "median_err_held_out_fwd_bwd": statistics.median(r["err_fwd_bwd"] for r in eh) if eh else float("nan"),
            "log_sq_residual": best_cost}


def _print_calibration(res: dict[str, Any]) -> None:
    p = res["params"]
    print(f"calibration of profile {res['base_profile']} on {res['n_fit']} points ({res['statistic']} times), "
          f"validated on {res['n_held_out']} held-out points")
    print(f"  attention kernel {p['attention_flops'] / 1e9:.2f} GFLOP/s forward, backward at {p['bwd_efficiency']:.2f}× "
          f"that; latency {p['latency_intra'] * 1e6:.0f} µs/message; bandwidth {p['intra_bw'] / 1e9:.3f} GB/s; "
          f"call overhead {p['call_overhead'] * 1e3:.2f} ms; ring overlap {p['overlap']:.2f}; "
          f"ranks computing at full speed at once {p['concurrency']:.2f}")
    head = f"  {'half':<9} {'P':>2} {'strategy':<10} {'layout':<10} {'S':>6} {'fwd ms':>9} {'pred':>9} {'err':>6} " \
           f"{'f+b ms':>9} {'pred':>9} {'err':>6}"
    print(head)
    for half in ("fit", "held_out"):
        for e in sorted(res[half], key=lambda e: (e["world"], e["strategy"], e["layout"], e["seq_len"])):
            print(f"  {half:<9} {e['world']:>2} {e['strategy']:<10} {e['layout']:<10} {e['seq_len']:>6} "
                  f"{1e3 * e['fwd']:>9.1f} {1e3 * e['pred_fwd']:>9.1f} {e['err_fwd']:>6.0%} "
                  f"{1e3 * e['fwd_bwd']:>9.1f} {1e3 * e['pred_fwd_bwd']:>9.1f} {e['err_fwd_bwd']:>6.0%}")
    print(f"median relative error: fit half {res['median_err_fit']:.1%}; HELD-OUT half {res['median_err_held_out']:.1%} "
          f"(forward {res['median_err_held_out_fwd']:.1%}, forward+backward {res['median_err_held_out_fwd_bwd']:.1%})")


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + "\n".join(__doc__.strip().splitlines()[-3:]))
    p.add_argument("--model", default="llama2_7b", help=f"model preset: {', '.join(MODELS)} (default llama2_7b)")
    for name in ("layers", "hidden", "heads", "kv-heads", "head-dim", "ffn", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--attention", choices=("softmax", "linear"), default=None, help="override the attention kind")
    p.add_argument("--hardware", default=None,
                   help=f"profile: {', '.join(PROFILES)} (default h100_sxm; --calibrate: from the results' hardware)")
    p.add_argument("--calibration", default=None, help="JSON from --calibrate --json: apply its fitted parameters")
    p.add_argument("--seq-len", default="128k,512k,1M", help="comma-separated token counts (k/M suffixes)")
    p.add_argument("--gpus", default=",".join(str(2 ** i) for i in range(13)), help="comma-separated GPU counts "
                   "(default 1,2,4,…,4096)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=3, help="ZeRO stage / FSDP (3) of the states")
    p.add_argument("--strategies", default=None, help="restrict to these (none,ring,zigzag,ulysses,hybrid,allgather,lasp2)")
    p.add_argument("--all", action="store_true", help="also print the best configuration of every strategy")
    p.add_argument("--published", action="store_true", help="print published figures of other systems to compare with")
    p.add_argument("--calibrate", default=None, metavar="RESULTS", nargs="+",
                   help="fit the profile to `bench sweep` results and report held-out error (no plan)")
    p.add_argument("--statistic", choices=("median", "min"), default="median",
                   help="--calibrate: which time of each point to fit (default median)")
    p.add_argument("--json", default=None, help="write the plan or the calibration here")
    return p


def _model(args: argparse.Namespace) -> ModelShape:
    if args.model not in MODELS:
        raise UserError(f"plan: unknown --model {args.model!r}; choose from {', '.join(MODELS)}")
    base = MODELS[args.model]
    kw = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "attention"):
        val = getattr(args, name)
        if val is not None:
            kw[name] = val
            kw["name"] = f"{base.name} (modified)"
    if args.heads is not None and args.kv_heads is None:
        kw["kv_heads"] = None
    if (args.hidden is not None or args.heads is not None) and args.head_dim is None:
        kw["head_dim"] = None
    try:
        return ModelShape(**kw)
    except ValueError as e:
        raise UserError(f"plan: {e}") from None


def _profile(args: argparse.Namespace) -> DeviceProfile:
    try:
        prof = get_profile(args.hardware or "h100_sxm")
    except ValueError as e:
        raise UserError(f"plan: --hardware: {e}") from None
    if args.calibration:
        try:
            with open(args.calibration) as fh:
                data = json.load(fh)
            prof = prof.with_calibration(data["params"])
        except (OSError, KeyError, json.JSONDecodeError, ValueError) as e:
            raise UserError(f"plan: --calibration {args.calibration}: {e}") from None
    return prof


def _base_for(records: list[dict]) -> DeviceProfile:
    gpu = next((r.get("hardware", {}).get("gpu_name") for r in records if r.get("hardware", {}).get("gpu_name")), None)
    dev = next((r["config"].get("device") for r in records), "cpu") or "cpu"
    if gpu and str(dev).startswith("cuda"):
        g = gpu.upper()
        for frag, name in (("H200", "h200"), ("H100", "h100_sxm"), ("A100", "a100_80g")):
            if frag in g:
                return PROFILES[name]
    return PROFILES["cpu_gloo"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``longreach plan``."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.calibrate:
        records = load_results(args.calibrate)
        base = _profile(args) if args.hardware else _base_for(records)
        res = calibrate(records, base, statistic=args.statistic)
        _print_calibration(res)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=1, default=str)
            print(f"wrote {args.json}")
        return 0
    model = _model(args)
    prof = _profile(args)
    seqs = _int_list(args.seq_len, "seq-len")
    gpus = _int_list(args.gpus, "gpus")
    strategies = None
    if args.strategies:
        strategies = {s.strip() for s in args.strategies.split(",") if s.strip()}
        known = {"none", "ring", "zigzag", "ulysses", "hybrid", "allgather", "lasp2"}
        if strategies - known:
            raise UserError(f"plan: --strategies: unknown {sorted(strategies - known)}; choose from {sorted(known)}")
    if prof.peak_flops is None and prof.attention_flops is None:
        raise UserError(f"plan: profile {prof.name} has no FLOP/s; give --calibration")
    rows = plan_table(model, prof, seqs, gpus, zero=args.zero, strategies=strategies)
    _print_plan(rows, model, prof, args.zero, args.all)
    if args.published:
        print("\nPUBLISHED figures of other systems (measured by their authors, not by longreach):")
        for p in PUBLISHED:
            print(f"  {p['system']:<28} {p['setup']:<50} {p['figure']}  [{p['source']}]")
    if args.json:
        out = [{"seq_len": r["seq_len"], "gpus": r["gpus"], "best": _row_dict(r["best"]) if r["best"] else None,
                "per_strategy": {k: _row_dict(v) for k, v in r["per_strategy"].items()}} for r in rows]
        with open(args.json, "w") as fh:
            json.dump({"model": dataclasses.asdict(model), "profile": dataclasses.asdict(prof), "zero": args.zero,
                       "rows": out}, fh, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
