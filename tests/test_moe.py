"""MoE FFN: routing, losses, capacity, grouped experts, expert parallelism, attention-aware routing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longreach.mixtures import moe_config
from longreach.mixtures.moe import MoEConfig, MoEFFN
from longreach.mixtures.routing import (attention_mix, balance_loss, explicit_attention_matrix, similarity_mix,
                                        top_k_gates, z_loss)
from longreach.models import ModelConfig, build_model
from longreach.models.config import MoEOptions
from longreach.testing import run_ranks
from workers.moe import ep_and_cp_routing as _ep_and_cp_routing
from workers.moe import ep_mismatches

torch.set_num_threads(1)


def _naive_moe(layer: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop over chosen experts (the oracle; no capacity)."""
    n = x.shape[0] * x.shape[1]
    xf = x.reshape(n, -1)
    probs = (xf @ layer.router.weight.t()).softmax(-1)
    top_p, top_i = probs.topk(layer.cfg.top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    w1, w3, w2 = layer.experts.gate_proj.weight, layer.experts.up_proj.weight, layer.experts.down_proj.weight
    out = torch.zeros_like(xf)
    for t in range(n):
        for j in range(layer.cfg.top_k):
            e = top_i[t, j]
            h = F.silu(w1[e] @ xf[t]) * (w3[e] @ xf[t])
            out[t] += top_p[t, j] * (w2[e] @ h)
    return out.view_as(x)


def test_moe_matches_per_token_oracle_forward_and_backward():
    torch.manual_seed(0)
    layer = MoEFFN(MoEConfig(dim=12, hidden=20, num_experts=5, top_k=2, router_init_std=0.5)).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = _naive_moe(layer, x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    gx, *gw = torch.autograd.grad(y, [x, layer.router.weight, layer.experts.down_proj.weight], g)
    gx_ref, *gw_ref = torch.autograd.grad(y_ref, [x2, layer.router.weight, layer.experts.down_proj.weight], g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(gw, gw_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert layer.stats["dropped"] == 0
    assert int(layer.stats["tokens_per_expert"].sum()) == 2 * 7 * 2


def test_losses_match_formulas():
    probs = torch.full((8, 4), 0.25)
    chosen = torch.tensor([[0, 1], [2, 3]] * 4)  # every expert chosen by half the tokens
    assert balance_loss(probs, chosen).item() == pytest.approx(2.0)  # = k under perfect balance
    skew = torch.tensor([[0, 1]] * 8)
    assert balance_loss(probs, skew).item() == pytest.approx(4 * (0.25 * 1 + 0.25 * 1))
    logits = torch.randn(6, 4, dtype=torch.float64)
    assert z_loss(logits).item() == pytest.approx((torch.logsumexp(logits, -1) ** 2).mean().item())
    gates, idx = top_k_gates(logits.softmax(-1), 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(6, dtype=torch.float64))
    layer = MoEFFN(MoEConfig(dim=8, hidden=8, num_experts=4, top_k=2, balance_coef=0.5, z_coef=0.25)).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    layer(x)
    lg = x.reshape(5, 8) @ layer.router.weight.t()
    _, top = lg.softmax(-1).topk(2, dim=-1)
    want = 0.5 * balance_loss(lg.softmax(-1), top) + 0.25 * z_loss(lg)
    torch.testing.assert_close(layer.aux_loss, want)


def test_capacity_drops_and_accounts():
    torch.manual_seed(1)
    cfg = MoEConfig(dim=6, hidden=6, num_experts=4, top_k=2, capacity_factor=0.5, router_init_std=1.0)
    layer = MoEFFN(cfg).double()
    x = torch.randn(1, 16, 6, dtype=torch.float64)
    y = layer(x)
    cap = math.ceil(0.5 * 16 * 2 / 4)
    kept, chosen = layer.stats["kept_per_expert"], layer.stats["tokens_per_expert"]
    assert torch.equal(kept, chosen.clamp(max=cap))
    assert layer.stats["dropped"] == int((chosen - kept).sum()) > 0
    assert int(kept.sum()) + layer.stats["dropped"] == layer.stats["assignments"] == 32
    # without capacity the same layer keeps everything and differs only on dropped tokens
    layer.cfg.capacity_factor = None
    y_full = layer(x)
    assert layer.stats["dropped"] == 0
    assert not torch.allclose(y, y_full)


def test_expert_parallel_equals_single_rank_and_cp_routing_mix():
    cases = [
        dict(experts=4, top_k=2, dim=8, hidden=12, batch=2, seq=5),
        dict(experts=8, top_k=1, dim=6, hidden=10, batch=1, seq=3),  # some experts get no token
        dict(experts=4, top_k=2, dim=8, hidden=12, batch=1, seq=9, capacity_factor=0.75),
    ]
    for world in (2, 4):
        res = run_ranks(_ep_and_cp_routing, world, args=(cases,))
        mismatches = ep_mismatches(cases, [ep for ep, _ in res])
        assert not mismatches, "\n".join(mismatches)
        failures = [f for _, routing in res for f in routing]
        assert not failures, "\n".join(failures)


def test_attention_mix_equals_explicit_product():
    torch.manual_seed(2)
    b, s, h, hkv, d, e = 2, 9, 4, 2, 6, 5
    q = torch.randn(b, s, h, d, dtype=torch.float64)
    k = torch.randn(b, s, hkv, d, dtype=torch.float64)
    probs = torch.randn(b, s, e, dtype=torch.float64).softmax(-1)
    mixed = attention_mix(probs, q, k)
    a = explicit_attention_matrix(q, k)  # [B, S, S]
    torch.testing.assert_close(mixed, a @ probs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mixed.sum(-1), torch.ones(b, s, dtype=torch.float64))
    # similarity-aware: S = causal row-softmax(X W_s Xᵀ / τ)
    x = torch.randn(b, s, d, dtype=torch.float64)
    w = torch.randn(d, d, dtype=torch.float64) * 0.3
    tau = 0.7
    sim = similarity_mix(probs, x, x @ w.t(), tau=tau)
    sc = (x @ w.t()) @ x.transpose(1, 2) / tau
    sc = sc.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(sim, sc.softmax(-1) @ probs, rtol=1e-10, atol=1e-12)


def test_attention_routed_model_uses_block_attention():
    """In a built model the MoE reads its block's q, k (mha via hook); A = I would give token routing."""
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_type="moe",
                      moe=MoEOptions(experts=4, top_k=2, routing="attention"))
    model = build_model(cfg).double()
    ids = torch.randint(0, 40, (1, 6))
    captured = {}
    moe = model.layers[0].mlp
    orig = moe._route_probs

    def spy(x, logits):
        captured["q"], captured["k"] = moe.routing_tap.q, moe.routing_tap.k
        out = orig(x, logits)
        captured["mixed"], captured["probs"] = out, logits.softmax(-1)
        return out

    moe._route_probs = spy
    model(ids).sum().backward()
    a = explicit_attention_matrix(captured["q"], captured["k"])[0]
    torch.testing.assert_close(captured["mixed"], a @ captured["probs"], rtol=1e-10, atol=1e-12)
    assert moe.routing_tap.q is None  # nothing kept across forwards
    assert model.layers[0].mlp.router.weight.grad is not None


def test_moe_options_typed_section_and_old_keys():
    """``model.moe`` is a typed section: a typo names the nearest key, ``--model.moe.top_k=1`` overrides it,
    an old ``model.extra.moe_*`` key names its new spelling, and the layer config follows the section."""
    from longreach.configio import from_dict, load_config
    from longreach.errors import ConfigError
    from longreach.job import JobConfig

    cfg = ModelConfig(dim=16, n_heads=2, ffn_type="moe", moe=MoEOptions(experts=4, top_k=1, hidden=24))
    layer = moe_config(cfg)
    assert (layer.num_experts, layer.top_k, layer.hidden, layer.routing) == (4, 1, 24, "token")
    assert ModelConfig(ffn_type="moe").moe == MoEOptions()  # choosing the type fills in the defaults
    with pytest.raises(ConfigError, match=r"unknown config key 'model.moe.topk'; did you mean 'model.moe.top_k'"):
        from_dict(JobConfig, {"model": {"ffn_type": "moe", "moe": {"topk": 2}}})
    job = load_config(JobConfig, "moe_tiny_cpu", ["--model.moe.top_k=1", "--model.moe.routing=similarity"])
    assert (job.model.moe.top_k, job.model.moe.routing, job.model.moe.experts) == (1, "similarity", 4)
    with pytest.raises(ConfigError, match="model.moe.routing must be one of 'token', 'attention', 'similarity'"):
        load_config(JobConfig, "moe_tiny_cpu", ["--model.moe.routing=tokens"])
    with pytest.raises(ConfigError, match=r"model.extra.moe_top_k is no longer read: .* moved to model.moe.top_k"):
        from_dict(JobConfig, {"model": {"ffn_type": "moe", "extra": {"moe_top_k": 2}}})
    with pytest.raises(ConfigError, match=r"model.moe is set but model.ffn_type is 'swiglu'"):
        load_config(JobConfig, "demo", ["--model.moe.top_k=1"])
    with pytest.raises(ConfigError, match="model.moe.top_k must be in 1..model.moe.experts=2"):
        MoEOptions(experts=2, top_k=3)
    with pytest.raises(ValueError, match="moe.top_k"):
        MoEConfig(dim=4, hidden=4, num_experts=2, top_k=3)


def test_attention_routing_gradient_reaches_q_k_exactly(monkeypatch):
    """routing_grad (default): gradients of the MoE output w.r.t. the preceding layer's q, k equal those of
    the explicit float64 P = A·softmax(W_r X); routing_grad=False gives q, k no gradient from routing."""
    import dataclasses

    import longreach.mixtures.moe as moe_mod
    from longreach.attention import AttentionContext, LocalAttention
    from longreach.mixtures.routing import RoutingTap

    torch.manual_seed(4)
    s = 7
    cfg = MoEConfig(dim=8, hidden=10, num_experts=4, top_k=2, routing="attention", router_init_std=0.5)
    layer = MoEFFN(cfg).double()
    q = torch.randn(1, s, 4, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, s, 2, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, s, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, s, 8, dtype=torch.float64)

    def run() -> list[torch.Tensor | None]:
        layer.routing_tap = RoutingTap()
        layer.routing_tap.record(q, k, AttentionContext(), LocalAttention("reference"))
        return list(torch.autograd.grad((layer(x) * t).sum(), [q, k, x, layer.router.weight], allow_unused=True))

    got = run()
    with monkeypatch.context() as m:
        m.setattr(moe_mod, "attention_mix", lambda probs, q, k, **kw: explicit_attention_matrix(q, k) @ probs)
        want = run()
    for name, a, b in zip(("q", "k", "x", "router"), got, want):
        assert a is not None and a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    layer.cfg = dataclasses.replace(cfg, routing_grad=False)
    gq, gk, gx, gr = run()
    assert gq is None and gk is None  # A is a constant of routing
    torch.testing.assert_close(gx, got[2], rtol=1e-9, atol=1e-12)  # the gates' gradient is unchanged
    torch.testing.assert_close(gr, got[3], rtol=1e-9, atol=1e-12)


def test_attention_routing_gradient_reaches_mha_projections_through_hook():
    """A built model with the Llama mha: the routing gradient reaches q_proj (forward hook recomputes q, k
    with gradient); turning routing_grad off changes exactly that contribution, not the output."""
    ids = torch.randint(0, 40, (1, 6))
    grads, outs = {}, {}
    for flag in (True, False):
        torch.manual_seed(3)
        cfg = ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_type="moe",
                          moe=MoEOptions(experts=4, top_k=2, routing="attention", routing_grad=flag))
        model = build_model(cfg).double()
        out = model(ids)
        out.square().sum().backward()
        grads[flag], outs[flag] = model.layers[0].self_attn.q_proj.weight.grad, out.detach()
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
    assert (grads[True] - grads[False]).abs().max() > 1e-8


def test_similarity_routing_multi_head_equals_explicit():
    torch.manual_seed(6)
    b, s, d, e, heads, tau = 2, 9, 8, 5, 4, 0.7
    x = torch.randn(b, s, d, dtype=torch.float64)
    xp = torch.randn(b, s, d, dtype=torch.float64)
    probs = torch.randn(b, s, e, dtype=torch.float64).softmax(-1)
    got = similarity_mix(probs, x, xp, tau=tau, heads=heads)
    sc = torch.einsum("bqhd,bkhd->bhqk", xp.view(b, s, heads, 2), x.view(b, s, heads, 2)) / tau
    sc = sc.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(got, sc.softmax(-1).mean(1) @ probs, rtol=1e-10, atol=1e-12)
    cfg = ModelConfig(dim=16, n_heads=4, ffn_type="moe", moe=MoEOptions(routing="similarity"))
    assert moe_config(cfg).similarity_heads == 4
