"""``longreach bench kernels``: sparse-mask attention cost against dense causal attention, measured honestly.

For each mask at one sequence length (default 8192 tokens, one thread) it times a masked backend (default
``slices``: the mask as batched dense calls of PyTorch's CPU flash kernel) against the dense causal ``cpu``
kernel in *interleaved rounds*: every round times dense causal and then every mask once, in one process, and
each mask's time is divided by the causal time of its own round; the table gives the median ratio and its
spread (min–max over rounds) for the forward and for forward+backward, beside the mask's *ideal* ratio
(allowed pairs ÷ causal pairs) and the target ``1.25 × ideal + 0.05`` (``1.5 ×`` for SSA). ``--compare`` adds a
second backend to the same rounds. ``--clock cpu`` times with the process CPU clock instead of elapsed time:
on a machine shared with other jobs it leaves out the time the (one-thread) process waits for a core. With ``--cp`` it also spawns gloo ranks (default 4) and counts the bytes a
ring context-parallel step sends with a sliding window against full causal
(:class:`longreach.parallel.CommRecorder`). ``--suite lightning`` hands over to
``longreach.bench.lightning:run(args)``.

    longreach bench kernels                                  # 8k tokens, every mask, fwd and fwd+bwd
    longreach bench kernels --masks s2_varlen,ssa --rounds 7 --compare cpu_sparse --json out.json
    longreach bench kernels --rounds 7 --clock cpu                     # on a shared machine
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from longreach.errors import UserError

MASK_NAMES = ("causal", "sliding_window", "sinks_window", "documents", "power", "s2_varlen", "s2_roll",
              "s2_varlen_8", "s2_roll_8", "sf", "ssa")
PASSES = ("fwd", "fwdbwd")


def build_mask(name: str, seq_len: int, *, window: int, block: int, seed: int):
    """The benchmarked mask ``name`` for ``seq_len`` tokens (LongLoRA group N/4; the ``_8`` variants N/8)."""
    from longreach.kernels import masks as M

    group = max(2, (seq_len // 4) // 2 * 2)
    group8 = max(2, (seq_len // 8) // 2 * 2)
    table: dict[str, Callable[[], Any]] = {
        "causal": M.causal,
        "sliding_window": lambda: M.sliding_window(window),
        "sinks_window": lambda: M.sinks(4) | M.sliding_window(window),
        "documents": lambda: M.documents([0, seq_len // 8, seq_len // 4, seq_len // 2, seq_len]),
        "power": lambda: M.power(block),
        "s2_varlen": lambda: M.s2(group, "varlen"),
        "s2_roll": lambda: M.s2(group, "roll"),
        "s2_varlen_8": lambda: M.s2(group8, "varlen"),
        "s2_roll_8": lambda: M.s2(group8, "roll"),
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


def target_ratio(name: str, ideal: float) -> float:
    """The target for time ÷ dense causal: 1.25 × ideal + 0.05 (1.5 × for SSA)."""
    return (1.5 if name == "ssa" else 1.25) * ideal + 0.05


def _step(backend, q, k, v, mask, backward: bool) -> Callable[[], None]:
    def go() -> None:
        out, lse = backend.forward(q, k, v, mask=mask, scale=None)
        if backward:
            backend.backward(torch.ones_like(out), q, k, v, out, lse, mask=mask, scale=None)
    return go


#: ``--clock`` choices: elapsed time, or CPU time of this process (steadier on a shared machine: time the
#: process spends waiting for a core is not counted; with one thread it is the work done).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _seconds(fn: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def interleaved(candidates: dict[str, Callable[[], None]], baseline: str, rounds: int,
                clock: str = "wall") -> dict[str, list[float]]:
    """Time every candidate once per round (warm-up round discarded); per-round ratios to ``baseline``."""
    for fn in candidates.values():
        fn()  # warm-up: allocations, plan caches
    ratios: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        times = {name: _seconds(fn, CLOCKS[clock]) for name, fn in candidates.items()}
        for name, t in times.items():
            ratios[name].append(t / times[baseline])
        ratios.setdefault("_baseline_seconds", []).append(times[baseline])
    return ratios


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "rounds": len(xs)}


def run_masks(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows per mask: density, ideal ratio, target, and per pass the median/min/max time ratio to causal."""
    from longreach.kernels import masks as M
    from longreach.kernels.api import get_backend

    torch.manual_seed(0)
    s, h, d, b = args.seq_len, args.heads, args.head_dim, args.batch
    dtype = getattr(torch, args.dtype)
    q = torch.randn(b, s, h, d, dtype=dtype)  # [B, S, H, D]
    k = torch.randn(b, s, max(1, h // args.gqa), d, dtype=dtype)  # [B, S, Hkv, D]
    v = torch.randn_like(k)
    dense = get_backend("cpu")
    backends = {args.backend: get_backend(args.backend)}
    if args.compare:
        backends[args.compare] = get_backend(args.compare)
    masks = {name: build_mask(name, s, window=args.window, block=args.block, seed=0) for name in args.masks}
    causal_density = (s + 1) / (2 * s)
    rows: dict[str, dict[str, Any]] = {}
    for name, mask in masks.items():
        dens = mask_density(mask, s, h)
        ideal = dens / causal_density
        rows[name] = {"mask": name, "density": dens, "ideal": ideal, "target": target_ratio(name, ideal)}
    for pass_name in args.passes:
        bwd = pass_name == "fwdbwd"
        cands = {"causal": _step(dense, q, k, v, M.causal(), bwd)}
        for name, mask in masks.items():
            for bname, be in backends.items():
                cands[f"{name}|{bname}"] = _step(be, q, k, v, mask, bwd)
        print(f"  {pass_name}: {len(cands)} candidates x {args.rounds} rounds", file=sys.stderr, flush=True)
        ratios = interleaved(cands, "causal", args.rounds, args.clock)
        for name in masks:
            for bname in backends:
                rows[name][f"{pass_name}:{bname}"] = _summary(ratios[f"{name}|{bname}"])
        rows.setdefault("_causal", {"mask": "causal (cpu, dense)"})[f"{pass_name}:seconds"] = _summary(
            ratios["_baseline_seconds"])
    return list(rows.values())


def run_layout(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The CPU kernel on the same q/k/v stored token-major and heads-first, for the block shapes of a
    zigzag ring step (the diagonal causal block and the two half blocks): per pass, heads-first time ÷
    token-major time, interleaved rounds. dout is token-major in both (the layout the context-parallel
    layers hand the kernel)."""
    from longreach.kernels import masks as M
    from longreach.kernels.api import get_backend
    from longreach.kernels.dense import heads_major

    torch.manual_seed(0)
    be = get_backend("cpu")
    s, h, d, b = args.seq_len, args.heads, args.head_dim, args.batch
    hkv, dtype = max(1, h // args.gqa), getattr(torch, args.dtype)
    shapes = {f"causal {s}x{s}": (s, s, M.causal()), f"full {s // 2}x{s}": (s // 2, s, None),
              f"full {s}x{s // 2}": (s, s // 2, None)}

    def step(q, k, v, mask, bwd: bool) -> Callable[[], None]:
        def go() -> None:
            out, lse = be.forward(q, k, v, mask=mask, scale=None)
            if bwd:
                be.backward(torch.ones(out.shape, dtype=out.dtype), q, k, v, out, lse, mask=mask, scale=None)
        return go

    rows = []
    for name, (sq, sk, mask) in shapes.items():
        q = torch.randn(b, sq, h, d, dtype=dtype)  # [B, Sq, H, D] token-major
        k, v = (torch.randn(b, sk, hkv, d, dtype=dtype) for _ in range(2))
        row: dict[str, Any] = {"block": name}
        for pass_name in args.passes:
            bwd = pass_name == "fwdbwd"
            ratios = interleaved({"tokens": step(q, k, v, mask, bwd),
                                  "heads": step(*(heads_major(t) for t in (q, k, v)), mask, bwd)},
                                 "tokens", args.rounds, args.clock)
            row[pass_name] = _summary(ratios["heads"])
            row[f"{pass_name}:seconds"] = _summary(ratios["_baseline_seconds"])
        rows.append(row)
    return rows


def run_model(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Training-step tokens/s of a small longreach Llama per attention pattern, interleaved rounds.

    Every pattern gets the same model (same seed) with its ``inner_attention`` swapped, as ``parallelize``
    does; a step is forward, chunked loss, backward and an SGD update on one sequence of ``--seq-len``.
    """
    from longreach.attention import AttentionContext, LocalAttention
    from longreach.kernels import masks as M
    from longreach.models import build_model
    from longreach.models.config import ModelConfig

    s = args.seq_len
    cfg = ModelConfig(arch="llama", vocab_size=1024, dim=args.model_dim, n_layers=args.model_layers,
                      n_heads=args.heads, max_seq_len=s)
    group = max(2, (s // 4) // 2 * 2)
    train_masks = {"full": None, "s2": M.s2(group, "varlen"), "s2_roll": M.s2(group, "roll"), "sf": M.sf(group, 4),
                   "ssa": M.ssa(0.25, window=2, block=args.block, seed=0)}
    ids = torch.randint(0, cfg.vocab_size, (1, s + 1), generator=torch.Generator().manual_seed(0))
    steps: dict[str, Callable[[], None]] = {}
    for name in args.patterns:
        if name not in train_masks:
            raise UserError(f"bench kernels --patterns: unknown pattern {name!r}; choose from {', '.join(train_masks)}")
        torch.manual_seed(0)
        model = build_model(cfg)
        for layer in model.layers:
            layer.self_attn.inner_attention = LocalAttention(args.backend if args.backend != "slices" else "auto",
                                                             train_mask=train_masks[name])
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt) -> None:
            loss_sum, n_tok = model(ids[:, :-1], ctx=AttentionContext(seq_len=s), labels=ids[:, 1:])
            (loss_sum / n_tok).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    ratios = interleaved(steps, args.patterns[0], args.rounds, args.clock)
    base = ratios["_baseline_seconds"]
    rows = []
    for name in args.patterns:
        secs = [r * b for r, b in zip(ratios[name], base)]
        rows.append({"pattern": name, "tokens_per_s": _summary([s / x for x in secs]),
                     f"time/{args.patterns[0]}": _summary(ratios[name])})
        t = rows[-1]["tokens_per_s"]
        print(f"{name:<8} tokens/s {t['median']:8.0f} [{t['min']:.0f}-{t['max']:.0f}]   time/{args.patterns[0]} "
              f"{rows[-1][f'time/{args.patterns[0]}']['median']:.3f}")
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


def _table(rows: list[dict[str, Any]], passes: list[str], backends: list[str]) -> str:
    cols = [f"{p}:{b}" for p in passes for b in backends]
    head = f"{'mask':<14}{'density':>9}{'ideal':>8}{'target':>8}" + "".join(f"{c:>28}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["mask"].startswith("causal ("):
            secs = "  ".join(f"{p} {r[f'{p}:seconds']['median']:.3f}s" for p in passes if f"{p}:seconds" in r)
            lines.append(f"dense causal (cpu): median {secs}")
            continue
        cells = []
        for c in cols:
            x = r[c]
            mark = "ok" if x["median"] <= r["target"] else "over"
            cells.append(f"{x['median']:.3f} [{x['min']:.3f}-{x['max']:.3f}] {mark:>4}")
        lines.append(f"{r['mask']:<14}{r['density']:>9.3f}{r['ideal']:>8.3f}{r['target']:>8.3f}"
                     + "".join(f"{c:>28}" for c in cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("masks", "model", "lightning", "layout"), default="masks",
                   help="masks (default), model (training steps per pattern), lightning (longreach.bench.lightning) "
                        "or layout (the CPU kernel on heads-first vs token-major q/k/v)")
    p.add_argument("--patterns", default="full,s2", help="--suite model: patterns, the first is the baseline")
    p.add_argument("--model-dim", type=int, default=256, help="--suite model: width (default 256)")
    p.add_argument("--model-layers", type=int, default=4, help="--suite model: layers (default 4)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens (default 8192)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gqa", type=int, default=1, help="query heads per K/V head")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32")
    p.add_argument("--masks", default=",".join(MASK_NAMES[1:]), help="comma-separated subset of: " + ", ".join(MASK_NAMES))
    p.add_argument("--backend", default="slices", help="masked backend to time (default slices)")
    p.add_argument("--compare", default=None, help="a second backend timed in the same rounds (e.g. cpu_sparse)")
    p.add_argument("--passes", default="fwd,fwdbwd", help="comma-separated: fwd, fwdbwd (default both)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds after one warm-up (default 5)")
    p.add_argument("--window", type=int, default=1024, help="sliding window (tokens)")
    p.add_argument("--block", type=int, default=128, help="power / ssa block (tokens)")
    p.add_argument("--backward", action="store_true", help="time forward + backward only (same as --passes fwdbwd)")
    p.add_argument("--cp", action="store_true", help="also count ring CP bytes (2 gloo ranks)")
    p.add_argument("--cp-seq-len", type=int, default=4096)
    p.add_argument("--cp-ranks", type=int, default=4, help="gloo ranks for --cp (default 4)")
    p.add_argument("--cp-layout", default="contiguous", help="sequence layout for --cp (default contiguous)")
    p.add_argument("--cp-window", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: leave as is)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall (default) or cpu: CPU time of the process, steadier on a shared machine (one thread)")
    p.add_argument("--json", default=None, help="write the results here")
    # the lightning suite's own options (--lightning-*, --lasp-*)
    importlib.import_module("longreach.bench.lightning").add_arguments(p)
    return p


def _main_layout(args: argparse.Namespace) -> int:
    args.passes = ["fwdbwd"] if args.backward else [x.strip() for x in args.passes.split(",") if x.strip()]
    if any(x not in PASSES for x in args.passes) or args.rounds < 1 or args.seq_len < 2 or args.seq_len % 2 \
            or args.heads % args.gqa:
        raise UserError(f"bench kernels --suite layout: --passes from {', '.join(PASSES)}, --rounds >= 1, an even "
                        "--seq-len and --heads divisible by --gqa")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench kernels --suite layout: cpu kernel, q/k/v heads-first ÷ token-major, S={args.seq_len} "
          f"B={args.batch} H={args.heads} D={args.head_dim} {args.dtype}, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads, {args.clock} clock", flush=True)
    rows = run_layout(args)
    for row in rows:
        cells = [f"{p}: {row[p]['median']:.3f} [{row[p]['min']:.3f}-{row[p]['max']:.3f}] "
                 f"(token-major {row[p + ':seconds']['median'] * 1e3:.1f} ms)" for p in args.passes]
        print(f"  {row['block']:<16} " + "   ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "layout": rows}, f, indent=1, default=str)
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``longreach bench kernels``."""
    args = build_parser().parse_args(argv)
    if args.suite == "lightning":
        try:
            mod = importlib.import_module("longreach.bench.lightning")
        except ModuleNotFoundError as e:
            raise UserError("bench kernels --suite lightning: longreach.bench.lightning is not installed") from e
        return int(mod.run(args) or 0)
    if args.suite == "model":
        args.patterns = [x.strip() for x in args.patterns.split(",") if x.strip()]
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"bench kernels --suite model: Llama dim {args.model_dim} x {args.model_layers} layers, {args.heads} heads, "
              f"S={args.seq_len}, train steps, {args.rounds} interleaved rounds, {torch.get_num_threads()} threads, "
              f"{args.clock} clock")
        rows = run_model(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": vars(args), "model": rows}, f, indent=1, default=str)
        return 0
    if args.suite == "layout":
        return _main_layout(args)
    args.masks = [m.strip() for m in args.masks.split(",") if m.strip()]
    for m in args.masks:
        if m not in MASK_NAMES:
            raise UserError(f"bench kernels --masks: unknown mask {m!r}; choose from {', '.join(MASK_NAMES)}")
    args.passes = ["fwdbwd"] if args.backward else [x.strip() for x in args.passes.split(",") if x.strip()]
    for x in args.passes:
        if x not in PASSES:
            raise UserError(f"bench kernels --passes: unknown pass {x!r}; choose from {', '.join(PASSES)}")
    if args.seq_len < 1 or args.heads < 1 or args.head_dim < 1 or args.gqa < 1 or args.heads % args.gqa:
        raise UserError("bench kernels: --seq-len, --heads, --head-dim must be >= 1 and --heads divisible by --gqa")
    if args.rounds < 1:
        raise UserError("bench kernels --rounds: must be >= 1")
    from longreach.kernels.api import available_backends

    for name in filter(None, (args.backend, args.compare)):
        if name not in available_backends():
            raise UserError(f"bench kernels: unknown backend {name!r}; choose from {', '.join(available_backends())}")
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [args.backend] + ([args.compare] if args.compare else [])
    print(f"bench kernels: S={args.seq_len} B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} "
          f"{' and '.join(backends)} vs dense causal cpu, {'+'.join(args.passes)}, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads, {args.clock} clock", flush=True)
    rows = run_masks(args)
    print(_table(rows, args.passes, backends))
    print("cells: time / dense causal time of the same round, median [min-max] over rounds; ideal: allowed pairs / "
          "causal pairs; target: 1.25 x ideal + 0.05 (SSA 1.5 x); ok/over against the target")
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
