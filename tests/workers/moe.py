"""Spawned-rank workers for the mixture tests (expert parallelism over gloo)."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist

from longreach.attention import AttentionContext, ContextParallelAttention
from longreach.mixtures.moe import MoEConfig, MoEFFN
from longreach.mixtures.routing import attention_mix, explicit_attention_matrix, similarity_mix
from longreach.parallel import sequence_positions, shard_sequence


def _close(name: str, a: torch.Tensor, b: torch.Tensor, failures: list[str], tol: float = 1e-9) -> None:
    if a.shape != b.shape:
        failures.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        return
    err = (a - b).abs().max().item() if a.numel() else 0.0
    if not err <= tol * max(1.0, b.abs().max().item() if b.numel() else 1.0):
        failures.append(f"{name}: max abs error {err:.3e}")


EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def _ep_setup(case: dict, world_size: int, index: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``(the seeded float64 MoEFFN, x [P·B, S, D], target [P·B, S, D])`` of case ``index``: the same on every
    rank and in the test process; rank r holds rows r·B … r·B + B."""
    cfg = MoEConfig(dim=case["dim"], hidden=case["hidden"], num_experts=case["experts"], top_k=case["top_k"],
                    capacity_factor=case.get("capacity_factor"), router_init_std=0.5)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1234 + index)
        full = MoEFFN(cfg)
        x_all = torch.randn(world_size * case["batch"], case["seq"], case["dim"])
        return full, x_all, torch.randn_like(x_all)
    finally:
        torch.set_default_dtype(old)


def ep_reference(case: dict, world_size: int, index: int) -> dict[str, Any]:
    """The single-rank MoE layer on every rank's tokens with every expert (test-process side).

    Returns ``{"out" [P·B, S, D], "dx", "d<weight>" [E, ...] per expert weight, "drouter",
    "tokens_per_expert" [E], "dropped"}``.
    """
    ref, x, target = _ep_setup(case, world_size, index)
    x = x.clone().requires_grad_(True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as on the ranks
    try:
        y = ref(x)
        (y * target).sum().backward()
    finally:
        torch.set_default_dtype(old)
    out = {"out": y.detach(), "dx": x.grad, "drouter": ref.router.weight.grad,
           "tokens_per_expert": ref.stats["tokens_per_expert"].clone(), "dropped": int(ref.stats["dropped"])}
    out.update({f"d{name}": getattr(ref.experts, name).weight.grad for name in EXPERT_WEIGHTS})
    return out


def ep_equivalence(rank: int, world_size: int, cases: list[dict]) -> list[dict[str, Any]]:
    """Expert-parallel MoE on this rank's tokens with E/P experts, for each case (``experts, top_k, dim,
    hidden, batch, seq, capacity_factor``); the test compares with :func:`ep_reference`.

    Returns per case: ``out`` / ``dx`` of this rank's rows, ``d<weight>`` of its experts, ``drouter`` summed
    over ranks; the token counts (``chosen`` and ``kept`` per expert summed over ranks, ``received`` per local
    expert, ``dropped`` summed); and, with the expert weights replicated on every rank (what the trainer
    uses), ``replicated_out`` and the rank-summed ``replicated_d<weight>``.
    """
    torch.set_default_dtype(torch.float64)  # this rank process computes in float64 throughout
    group = dist.group.WORLD
    results = []
    for i, case in enumerate(cases):
        full, x_all, target = _ep_setup(case, world_size, i)
        sl = slice(rank * case["batch"], (rank + 1) * case["batch"])
        ep = copy.deepcopy(full)
        ep.shard_experts(group)
        x_loc = x_all[sl].clone().requires_grad_(True)
        y = ep(x_loc)
        (y * target[sl]).sum().backward()
        chosen = ep.stats["tokens_per_expert"].clone()
        kept = ep.stats["kept_per_expert"].clone()
        dist.all_reduce(chosen, group=group)
        dist.all_reduce(kept, group=group)
        g_router = ep.router.weight.grad.clone()
        dist.all_reduce(g_router, group=group)
        res: dict[str, Any] = {"out": y.detach(), "dx": x_loc.grad, "drouter": g_router, "chosen": chosen,
                               "kept": kept, "received": ep.stats["received_per_local_expert"].clone(),
                               "dropped": _sum_dropped(ep, group)}
        res.update({f"d{name}": getattr(ep.experts, name).weight.grad for name in EXPERT_WEIGHTS})
        rep = copy.deepcopy(full)
        rep.shard_experts(group, replicate_params=True)
        y_rep = rep(x_all[sl])
        (y_rep * target[sl]).sum().backward()
        res["replicated_out"] = y_rep.detach()
        for name in EXPERT_WEIGHTS:
            g = getattr(rep.experts, name).weight.grad.clone()
            dist.all_reduce(g, group=group)
            res[f"replicated_d{name}"] = g
        results.append(res)
    return results


def ep_mismatches(cases: list[dict], per_rank: list[list[dict[str, Any]]]) -> list[str]:
    """Compare every rank's :func:`ep_equivalence` result with :func:`ep_reference` (test-process side).

    Token counts are conserved in every case (choices per expert equal the single rank's; each rank
    received what all ranks kept for its experts; kept + dropped = tokens × k). Without a capacity limit
    (capacity is per rank's local tokens, so outputs legitimately differ with one) output, input gradient,
    this rank's expert gradients and the summed router gradient equal the single rank's, and so do the
    replicated-weight mode's output and summed expert gradients, within ``1e-9 × max(1, max |reference|)``.
    """
    bad: list[str] = []
    world = len(per_rank)

    def close(tag: str, got: torch.Tensor, want: torch.Tensor) -> None:
        atol = 1e-9 * max(1.0, float(want.abs().max()) if want.numel() else 1.0)
        try:
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"{tag}: {m}")
        except AssertionError as e:
            bad.append(str(e))

    for i, case in enumerate(cases):
        want = ep_reference(case, world, i)
        el = case["experts"] // world
        for rank, results in enumerate(per_rank):
            got, tag = results[i], f"P={world} rank {rank} case {i} {case}"
            es, sl = slice(rank * el, (rank + 1) * el), slice(rank * case["batch"], (rank + 1) * case["batch"])
            close(f"{tag} choices per expert", got["chosen"], want["tokens_per_expert"])
            close(f"{tag} received per local expert", got["received"], got["kept"][es])
            if int(got["kept"].sum()) + got["dropped"] != world * case["batch"] * case["seq"] * case["top_k"]:
                bad.append(f"{tag}: kept {int(got['kept'].sum())} + dropped {got['dropped']} != tokens * k")
            if case.get("capacity_factor") is not None:
                continue
            if want["dropped"]:
                bad.append(f"{tag}: the single rank dropped {want['dropped']} tokens without a capacity factor")
            close(f"{tag} out", got["out"], want["out"][sl])
            close(f"{tag} dx", got["dx"], want["dx"][sl])
            close(f"{tag} drouter", got["drouter"], want["drouter"])
            close(f"{tag} replicated out", got["replicated_out"], want["out"][sl])
            for name in EXPERT_WEIGHTS:
                close(f"{tag} d{name}", got[f"d{name}"], want[f"d{name}"][es])
                close(f"{tag} replicated d{name}", got[f"replicated_d{name}"], want[f"d{name}"])
    return bad


def _sum_dropped(layer, group) -> int:
    t = torch.tensor([layer.stats["dropped"]], dtype=torch.int64)
    dist.all_reduce(t, group=group)
    return int(t.item())


def _explicit_similarity(x: torch.Tensor, x_proj: torch.Tensor, tau: float, heads: int) -> torch.Tensor:
    """``[B, S, S]`` mean over heads of causal row-softmax((X W_s)_h X_hᵀ / τ) (materialised; the oracle)."""
    b, s, d = x.shape
    qh, kh = x_proj.view(b, s, heads, d // heads), x.view(b, s, heads, d // heads)
    sc = torch.einsum("bqhd,bkhd->bhqk", qh, kh) / tau
    sc = sc.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return sc.softmax(-1).mean(1)


def cp_attention_routing(rank: int, world_size: int, setups: list[tuple[str, str, int | None]]) -> list[str]:
    """Attention-/similarity-aware routing mixes through the context-parallel inner attention equal the
    single-rank explicit products A·P and S·P (multi-head S) on this rank's tokens, and so do the gradients
    with respect to P, q, k (attention-aware) and P, x, x W_s (similarity-aware), for every
    (strategy, layout, ulysses_degree) given."""
    failures: list[str] = []
    for strategy, layout, degree in setups:
        tag = f"P={world_size} {strategy}/{layout}"
        torch.manual_seed(7)
        b, s, h, hkv, d, e, heads, tau = 1, 8 * world_size, 4, 2, 8, 5, 4, 0.5
        q = torch.randn(b, s, h, d, dtype=torch.float64, requires_grad=True)
        k = torch.randn(b, s, hkv, d, dtype=torch.float64, requires_grad=True)
        x = torch.randn(b, s, d, dtype=torch.float64, requires_grad=True)
        xp = torch.randn(b, s, d, dtype=torch.float64, requires_grad=True)
        probs = torch.randn(b, s, e, dtype=torch.float64).softmax(-1).requires_grad_(True)
        tgt_a, tgt_s = torch.randn(b, s, e, dtype=torch.float64), torch.randn(b, s, e, dtype=torch.float64)
        want = explicit_attention_matrix(q, k) @ probs  # [B, S, E]
        want_sim = _explicit_similarity(x, xp, tau, heads) @ probs  # [B, S, E]
        grads_ref = torch.autograd.grad((want * tgt_a).sum() + (want_sim * tgt_s).sum(), [probs, q, k, x, xp])
        inner = ContextParallelAttention(strategy=strategy, layout=layout, ulysses_degree=degree, backend="reference")
        ctx = AttentionContext(seq_len=s, positions=sequence_positions(s, layout=layout))
        sh = lambda t: shard_sequence(t.detach(), layout=layout)  # noqa: E731
        local = [sh(t).requires_grad_(True) for t in (probs, q, k, x, xp)]
        lp, lq, lk, lx, lxp = local
        got = attention_mix(lp, lq, lk, inner=inner, ctx=ctx)
        _close(f"{tag} attention-aware", got, sh(want), failures)
        got_sim = similarity_mix(lp, lx, lxp, tau=tau, heads=heads, inner=inner, ctx=ctx)
        _close(f"{tag} similarity-aware ({heads} heads)", got_sim, sh(want_sim), failures)
        grads = torch.autograd.grad((got * sh(tgt_a)).sum() + (got_sim * sh(tgt_s)).sum(), local)
        for name, g, g_ref in zip(("probs", "q", "k", "x", "x W_s"), grads, grads_ref):
            _close(f"{tag} d{name}", g, sh(g_ref), failures)
    return failures


def ep_and_cp_routing(rank: int, world_size: int, cases: list[dict]) -> tuple[list[dict[str, Any]], list[str]]:
    """Both checks in one spawn (group start costs seconds): ``(ep_equivalence(cases), routing failures)``."""
    setups = [("ring", "zigzag", None), ("ring", "contiguous", None), ("ulysses", "zigzag", None)]
    if world_size == 4:
        setups += [("hybrid", "zigzag", 2), ("ulysses", "stripe", None)]
    return ep_equivalence(rank, world_size, cases), cp_attention_routing(rank, world_size, setups)
