"""``longreach bench mixtures``: per-layer cost of the mixture layers against dense layers of equal active size.

Each mixture layer is paired with the dense layer a fair comparison needs:

* ``moe E/top-k`` — the MoE FFN (E SwiGLU experts of hidden F, top-k) vs a dense SwiGLU of hidden k·F
  (the same active parameters per token): what dispatch (routing, sorting, gathering) costs;
* ``moh k of n`` (routed and masked execution) — MoH with ``n_shared`` shared heads and top-k of the
  routed ones vs dense attention with all H heads; ``moh core`` times only the attention core
  (MoH's per-head outputs vs the dense inner attention on the same q, k, v), where the saving lives;
* ``sqa`` — H_q = H/2 query heads vs dense attention with H heads;
* ``bam moa`` — BAM's soft mixture of N attention experts (H heads each, every token uses all) vs dense
  attention with N·H heads (equal active parameters).

Times are measured in interleaved rounds (every layer once per round, in turn), forward alone and
forward + backward; the table gives the median over rounds and the spread (min–max) of each layer's
time ratio to its dense partner, beside the analytic forward FLOP ratio. Memory: the bytes autograd saves
for backward (exact, any device) and, on CUDA, the peak allocated during forward + backward.

With ``--expert-bytes`` it also spawns gloo ranks (default 2, all of them the context-parallel group the
experts are split over) and reports the bytes of expert weights each rank holds under each engine — native
DDP, FSDP2, DeepSpeed ZeRO 0-3 in fp32 and bf16, and accelerate — with ``model.moe.expert_parallel`` on,
against the total.

    longreach bench mixtures                       # 8k tokens, dim 512, 8 heads of 64, 3 rounds
    longreach bench mixtures --seq-len 2048 --rounds 5 --json out.json
    longreach bench mixtures --only "moh core,moe"    # only these rows and their dense partners
    longreach bench mixtures --threads 1 --clock cpu  # CPU time of the process: steadier on a shared machine
    longreach bench mixtures --expert-bytes --rounds 1 --seq-len 256
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from longreach.attention import AttentionContext, LocalAttention
from longreach.bench.kernels import CLOCKS
from longreach.errors import UserError
from longreach.mixtures.bam import MoAConfig, MoAttention
from longreach.mixtures.moe import MoEConfig, MoEFFN
from longreach.mixtures.moh import MoHAttention, MoHConfig
from longreach.mixtures.sqa import SQAConfig, SQAttention
from longreach.models import ModelConfig
from longreach.models.llama import Attention, SwiGLU
from longreach.models.rope import RotaryEmbedding, apply_rotary
from longreach.testing import run_ranks

__all__ = ["LayerCase", "build_cases", "main", "run", "saved_bytes"]


@dataclass(kw_only=True)
class LayerCase:
    """One benchmarked layer: ``forward()`` returns the output to differentiate."""

    name: str
    baseline: str | None
    """Name of the dense case it is compared with (None: it is a baseline)."""
    flops: float
    """Analytic forward FLOPs of one call."""
    forward: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor] = field(default_factory=list)
    """Leaf tensors whose gradients the backward computes (besides the parameters)."""
    module: nn.Module | None = None


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensor storages autograd saves for backward during ``fn()``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _attn_flops(b: int, s: int, dim: int, d: int, heads: float, kv_heads: int, proj_heads: int) -> float:
    """Forward FLOPs of an attention layer: projections (q/o of ``proj_heads``, k/v of ``kv_heads``) and the
    causal score + value products of ``heads`` computed heads (``S(S+1)/2`` pairs each)."""
    return 2.0 * b * s * dim * d * (2 * proj_heads + 2 * kv_heads) + 4.0 * b * heads * d * s * (s + 1) / 2


def build_cases(args: argparse.Namespace) -> list[LayerCase]:
    """Every layer of the table with its inputs, seeded (float32 unless ``--dtype``)."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    b, s, dim, h, hkv, d = args.batch, args.seq_len, args.dim, args.heads, args.kv_heads, args.head_dim
    x = torch.randn(b, s, dim, dtype=dtype, requires_grad=True)  # [B, S, dim]
    pos = torch.arange(s).view(1, s).expand(b, s)
    cos, sin = RotaryEmbedding(d, 10000.0, None, s)(pos, s, dtype=dtype)
    ctx = AttentionContext()
    inner = LocalAttention(args.backend)

    def attn_case(name: str, layer: nn.Module, baseline: str | None, flops: float) -> LayerCase:
        layer = layer.to(dtype)
        layer.inner_attention = inner
        return LayerCase(name=name, baseline=baseline, flops=flops, forward=lambda: layer(x, cos, sin, ctx),
                         inputs=[x], module=layer)

    def dense_attention(heads: int, kv: int) -> Attention:
        return Attention(ModelConfig(dim=dim, n_heads=heads, n_kv_heads=kv, head_dim=d, vocab_size=8), 0)

    cases = [attn_case(f"dense attn H={h}", dense_attention(h, hkv), None, _attn_flops(b, s, dim, d, h, hkv, h))]
    routed_heads = h - args.moh_shared
    active = args.moh_shared + args.moh_top_k
    moh_name = f"moh {args.moh_top_k} of {routed_heads} routed (+{args.moh_shared} shared)"
    mohs = {}
    for execution in ("routed", "masked"):
        cfg = MoHConfig(dim=dim, n_heads=h, n_kv_heads=hkv, head_dim=d, n_shared=args.moh_shared,
                        top_k=args.moh_top_k, execution=execution)
        moh = MoHAttention(cfg)
        for r in (moh.router_shared, moh.router_routed, moh.router_mix):
            if r is not None:
                nn.init.normal_(r.weight, std=1.0)  # routing spread over the heads, not the first k
        mohs[execution] = moh
        computed = active if execution == "routed" else h
        cases.append(attn_case(f"{moh_name}, {execution}", moh, cases[0].name,
                               _attn_flops(b, s, dim, d, computed, hkv, h)))
    mohs["masked"].load_state_dict(mohs["routed"].state_dict())
    cases += _core_cases(mohs["routed"], x, cos, sin, ctx, inner, b, s, d, h, active)
    hq = max(1, h // 2)
    sqa_kv = math.gcd(hq, hkv)  # K/V heads must divide H_q
    cases.append(attn_case(f"sqa H_q={hq} H_kv={sqa_kv}",
                           SQAttention(SQAConfig(dim=dim, n_q_heads=hq, n_kv_heads=sqa_kv, head_dim=d)),
                           cases[0].name, _attn_flops(b, s, dim, d, hq, sqa_kv, hq)))
    n = args.moa_experts
    moa_base = f"dense attn H={n * h}"
    cases.append(attn_case(moa_base, dense_attention(n * h, n * hkv), None,
                           _attn_flops(b, s, dim, d, n * h, n * hkv, n * h)))
    cases.append(attn_case(f"bam moa {n}x{h} heads", MoAttention(MoAConfig(dim=dim, n_heads=h, n_kv_heads=hkv,
                                                                          head_dim=d, n_experts=n)),
                           moa_base, _attn_flops(b, s, dim, d, n * h, n * hkv, n * h) + 2.0 * b * s * dim * n))
    # FFNs: MoE (E experts of hidden F, top-k) vs the dense SwiGLU of hidden k·F
    e, k, f = args.moe_experts, args.moe_top_k, args.ffn_hidden
    dense_ffn = SwiGLU(ModelConfig(dim=dim, ffn_hidden=k * f, vocab_size=8, n_heads=h, head_dim=d), 0).to(dtype)
    ffn_base = f"dense ffn hidden={k * f}"
    cases.append(LayerCase(name=ffn_base, baseline=None, flops=6.0 * b * s * dim * k * f,
                           forward=lambda: dense_ffn(x), inputs=[x], module=dense_ffn))
    moe = MoEFFN(MoEConfig(dim=dim, hidden=f, num_experts=e, top_k=k, router_init_std=1.0)).to(dtype)
    cases.append(LayerCase(name=f"moe {e} experts top-{k}", baseline=ffn_base,
                           flops=6.0 * b * s * dim * k * f + 2.0 * b * s * dim * e,
                           forward=lambda: moe(x), inputs=[x], module=moe))
    return cases


def _core_cases(moh: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: Any, inner: Any,
                b: int, s: int, d: int, h: int, active: int) -> list[LayerCase]:
    """The attention core alone: the dense inner attention vs MoH's routed per-head outputs on one q, k, v."""
    with torch.no_grad():
        xd = x.detach()
        q = apply_rotary(moh.q_proj(xd).view(b, s, h, d), cos, sin)  # [B, S, H, D]
        k = apply_rotary(moh.k_proj(xd).view(b, s, moh.n_kv_heads, d), cos, sin)  # [B, S, Hkv, D]
        v = moh.v_proj(xd).view(b, s, moh.n_kv_heads, d)  # [B, S, Hkv, D]
        moh.gates(xd, q)  # sets routed_active: the routing the core runs
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    core = 4.0 * b * d * s * (s + 1) / 2
    base = f"dense attn core H={h}"
    return [LayerCase(name=base, baseline=None, flops=core * h, forward=lambda: inner(q, k, v, ctx), inputs=[q, k, v]),
            LayerCase(name=f"moh core ({active} of {h} heads active)", baseline=base, flops=core * active,
                      forward=lambda: moh._attend(q, k, v, ctx), inputs=[q, k, v])]


def _selected(cases: list[LayerCase], only: str | None) -> list[LayerCase]:
    """The cases whose name contains one of the comma-separated fragments of ``only``, with their baselines."""
    if not only:
        return cases
    fragments = [f.strip() for f in only.split(",") if f.strip()]
    keep = {c.name for c in cases if any(f in c.name for f in fragments)}
    if not keep:
        raise UserError(f"bench mixtures --only={only!r}: no layer name contains any of {fragments}; layers: "
                        + "; ".join(c.name for c in cases))
    keep |= {c.baseline for c in cases if c.name in keep and c.baseline is not None}
    return [c for c in cases if c.name in keep]


def _measure(case: LayerCase, backward: bool, clock: Callable[[], float] = time.perf_counter) -> float:
    for t in case.inputs:
        t.grad = None
    if case.module is not None:
        case.module.zero_grad(set_to_none=True)
    t0 = clock()
    if backward:
        out = case.forward()
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            case.forward()
    return clock() - t0


def _peak_cuda(case: LayerCase) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    _measure(case, True)
    return torch.cuda.max_memory_allocated() / 2 ** 20


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Interleaved rounds over every case; one row per case with medians, ratio spreads and memory."""
    cases = _selected(build_cases(args), args.only)
    for case in cases:  # warm-up: first-call allocations and kernel selection
        _measure(case, True)
    times: dict[str, dict[str, list[float]]] = {c.name: {"fwd": [], "fwd_bwd": []} for c in cases}
    for r in range(args.rounds):
        for case in cases:
            times[case.name]["fwd"].append(_measure(case, False, CLOCKS[args.clock]))
            times[case.name]["fwd_bwd"].append(_measure(case, True, CLOCKS[args.clock]))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    by_name = {c.name: c for c in cases}
    rows = []
    for case in cases:
        row: dict[str, Any] = {"layer": case.name, "baseline": case.baseline, "flops": case.flops,
                               "saved_mib": saved_bytes(case.forward) / 2 ** 20, "peak_mib": _peak_cuda(case)}
        for phase in ("fwd", "fwd_bwd"):
            own = times[case.name][phase]
            row[f"{phase}_s"] = statistics.median(own)
            if case.baseline is not None:
                ratios = [a / b for a, b in zip(own, times[case.baseline][phase])]  # per round: interleaved A/B
                row[f"{phase}_ratio"] = statistics.median(ratios)
                row[f"{phase}_ratio_spread"] = (min(ratios), max(ratios))
        if case.baseline is not None:
            row["flop_ratio"] = case.flops / by_name[case.baseline].flops
        rows.append(row)
    return rows


# --expert-bytes: engine name -> (engine.kind, engine.options, train.precision)
ENGINE_SPECS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ddp": ("native", {}, "fp32"),
    "fsdp2": ("native", {"fsdp": True}, "fp32"),
    "deepspeed": ("deepspeed", {"zero_stage": 1}, "fp32"),
    **{f"zero{z}": ("deepspeed", {"zero_stage": z}, "fp32") for z in range(4)},
    **{f"zero{z}-bf16": ("deepspeed", {"zero_stage": z}, "bf16") for z in range(4)},
    "accelerate": ("accelerate", {}, "fp32"),  # bf16: the same fp32 parameters under autocast
}
ENGINES = tuple(ENGINE_SPECS)
DEFAULT_EP_ENGINES = ("ddp", "fsdp2", "zero1", "zero2", "zero3", "zero1-bf16", "zero2-bf16", "zero3-bf16", "accelerate")


def _held_bytes(p: torch.Tensor) -> int:
    """Bytes of ``p`` this rank stores: an FSDP2 DTensor's local shard, a DeepSpeed ZeRO-3 partition."""
    if hasattr(p, "ds_tensor"):
        p = p.ds_tensor
    elif hasattr(p, "to_local"):
        p = p.to_local()
    return p.numel() * p.element_size()


def expert_bytes_worker(rank: int, world_size: int, engines: list[str], experts: int, dim: int, hidden: int
                        ) -> dict[str, dict[str, int]]:
    """One rank: build a 2-layer MoE model with experts split over cp = all ranks, wrap it in each engine
    (:data:`ENGINE_SPECS`), and count the expert-weight bytes this rank stores (FSDP2/DeepSpeed: their
    local shards; split experts stay fp32 under bf16: they are their own masters)."""
    import dataclasses

    from longreach.engines import EngineConfig, build_engine
    from longreach.job import JobConfig
    from longreach.mixtures.expert_parallel import expert_shards
    from longreach.models import build_model
    from longreach.models.config import MoEOptions, ModelConfig
    from longreach.parallel.config import ParallelConfig
    from longreach.parallel.mesh import ParallelDims
    from longreach.model_setup import parallelize

    out: dict[str, dict[str, int]] = {}
    mesh = ParallelDims(world_size=world_size, dp=1, cp=world_size).build_mesh("cpu")
    for name in engines:
        torch.manual_seed(0)
        model_cfg = ModelConfig(vocab_size=64, dim=dim, n_layers=2, n_heads=4, n_kv_heads=4, ffn_type="moe",
                                moe=MoEOptions(experts=experts, top_k=2, hidden=hidden, expert_parallel=True))
        kind, options, precision = ENGINE_SPECS[name]
        ecfg = EngineConfig(kind=kind, options=options)
        job = JobConfig(model=model_cfg, parallel=ParallelConfig(cp=world_size, layout="contiguous"), engine=ecfg)
        job = dataclasses.replace(job, train=dataclasses.replace(job.train, precision=precision))
        model = parallelize(build_model(model_cfg), job, mesh)
        engine = build_engine(ecfg.with_precision(precision), model, lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                              mesh=mesh)
        shards = expert_shards(engine.module)
        split = {id(p) for p in shards.params} if shards is not None else set()
        expert = sum(_held_bytes(p) for p in shards.params) if shards is not None else 0
        total = expert
        for pname, p in engine.module.named_parameters():  # ZeRO-3: the split experts are not among them
            if id(p) in split:
                continue
            total += _held_bytes(p)
            if ".experts." in pname:  # experts left replicated (none when split)
                expert += _held_bytes(p)
        out[name] = {"expert_bytes": expert, "param_bytes": total,
                     "expert_bytes_total": 2 * 3 * experts * dim * hidden * 4}
        engine.close()
    return out


def run_expert_bytes(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn ``--ep-ranks`` gloo ranks; per-rank expert bytes under each engine."""
    res = run_ranks(expert_bytes_worker, args.ep_ranks,
                    args=(list(args.ep_engines), args.moe_experts, args.dim, args.ffn_hidden), timeout=600)
    return {"ranks": args.ep_ranks, "per_rank": res}


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'layer':<46}{'FLOP ratio':>11}{'fwd s':>9}{'fwd ratio (min-max)':>22}{'fwd+bwd s':>11}"
            f"{'fwd+bwd ratio (min-max)':>26}{'saved MiB':>11}{'peak MiB':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def ratio(phase: str) -> str:
            if r["baseline"] is None:
                return "baseline"
            lo, hi = r[f"{phase}_ratio_spread"]
            return f"{r[f'{phase}_ratio']:.3f} ({lo:.2f}-{hi:.2f})"
        flop = f"{r['flop_ratio']:.3f}" if r["baseline"] is not None else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        lines.append(f"{r['layer']:<46}{flop:>11}{r['fwd_s']:>9.3f}{ratio('fwd'):>22}{r['fwd_bwd_s']:>11.3f}"
                     f"{ratio('fwd_bwd'):>26}{r['saved_mib']:>11.1f}{peak:>10}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach bench mixtures", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence (default 8192)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=512, help="model width")
    p.add_argument("--heads", type=int, default=8, help="query heads H of the dense attention")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--moh-shared", type=int, default=2, help="MoH shared heads")
    p.add_argument("--moh-top-k", type=int, default=2, help="MoH routed heads active per token")
    p.add_argument("--moa-experts", type=int, default=2, help="BAM attention experts N")
    p.add_argument("--moe-experts", type=int, default=8, help="MoE experts E")
    p.add_argument("--moe-top-k", type=int, default=2, help="MoE experts per token")
    p.add_argument("--ffn-hidden", type=int, default=1024, help="hidden size F of each expert")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32")
    p.add_argument("--backend", default="auto", help="local attention backend (default auto)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall (default) or cpu: CPU time of the process, steadier on a shared machine (--threads 1)")
    p.add_argument("--expert-bytes", action="store_true",
                   help="also count per-rank expert bytes under native DDP, FSDP2, DeepSpeed ZeRO 0-3 (fp32, bf16) "
                        "and accelerate (gloo ranks)")
    p.add_argument("--ep-ranks", type=int, default=2, help="gloo ranks for --expert-bytes (default 2)")
    p.add_argument("--ep-engines", default=",".join(DEFAULT_EP_ENGINES),
                   help="engines for --expert-bytes (default: %(default)s); any of " + ", ".join(ENGINES))
    p.add_argument("--only", default=None,
                   help="comma-separated name fragments: time only the layers whose name contains one (and their "
                        "dense partners), e.g. --only moh,moe")
    p.add_argument("--json", default=None, help="write the rows here")
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("seq_len", "batch", "dim", "heads", "kv_heads", "head_dim", "moa_experts", "moe_experts",
                 "moe_top_k", "ffn_hidden", "rounds"):
        if getattr(args, name) < 1:
            raise UserError(f"bench mixtures: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.heads % args.kv_heads:
        raise UserError(f"bench mixtures: --kv-heads={args.kv_heads} must divide --heads={args.heads}")
    if not 0 <= args.moh_shared < args.heads or not 1 <= args.moh_top_k <= args.heads - args.moh_shared:
        raise UserError(f"bench mixtures: need 0 <= --moh-shared < --heads and 1 <= --moh-top-k <= "
                        f"{args.heads - args.moh_shared} (the routed heads); got {args.moh_shared}, {args.moh_top_k}")
    if args.only is not None and not [f for f in args.only.split(",") if f.strip()]:
        raise UserError("bench mixtures: --only needs at least one layer-name fragment, e.g. --only moh,moe")
    args.ep_engines = [e.strip() for e in str(args.ep_engines).split(",") if e.strip()]
    bad = [e for e in args.ep_engines if e not in ENGINES]
    if bad:
        raise UserError(f"bench mixtures --ep-engines: unknown engine {bad[0]!r}; choose from {', '.join(ENGINES)}")
    if args.expert_bytes and (args.ep_ranks < 1 or args.moe_experts % args.ep_ranks):
        raise UserError(f"bench mixtures: --moe-experts={args.moe_experts} must divide by --ep-ranks={args.ep_ranks}")
    if args.moe_top_k > args.moe_experts:
        raise UserError(f"bench mixtures: --moe-top-k={args.moe_top_k} exceeds --moe-experts={args.moe_experts}")


def main(argv: list[str]) -> int:
    """Entry point of ``longreach bench mixtures``."""
    args = build_parser().parse_args(argv)
    _check(args)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    setting = (f"S={args.seq_len} B={args.batch} dim={args.dim} H={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
               f"{args.dtype} backend={args.backend}")
    print(f"bench mixtures: {setting}, {args.rounds} interleaved rounds, {torch.get_num_threads()} threads, "
          f"{args.clock} clock", flush=True)
    result: dict[str, Any] = {"config": vars(args), "rows": run(args)}
    print(_table(result["rows"]) + "\nratios: this layer's time / its dense partner's, per round (median, min-max); "
          "FLOP ratio: analytic forward FLOPs / the partner's; saved MiB: bytes autograd keeps for backward; "
          "peak MiB: CUDA only")
    if args.expert_bytes:
        eb = result["expert_bytes"] = run_expert_bytes(args)
        for r, per in enumerate(eb["per_rank"]):
            for name, c in per.items():
                print(f"expert bytes, {name:<15} rank {r}/{eb['ranks']}: {c['expert_bytes']} of "
                      f"{c['expert_bytes_total']} ({c['expert_bytes'] / c['expert_bytes_total']:.3f}); all "
                      f"parameters on this rank {c['param_bytes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
