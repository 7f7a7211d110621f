"""MoH (mixture-of-head attention) and SQA (sparse query attention) against dense attention."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from longreach.attention import AttentionContext
from longreach.errors import ConfigError
from longreach.mixtures import convert_to_moh, moh_config
from longreach.mixtures.moh import MoHAttention, MoHConfig, moh_from_dense
from longreach.mixtures.routing import balance_loss
from longreach.mixtures.sqa import SQAConfig, SQAttention
from longreach.models import ModelConfig, build_model
from longreach.models.config import MoHOptions, SQAOptions
from longreach.models.llama import Attention
from longreach.models.rope import RotaryEmbedding

torch.set_num_threads(1)


def _dense(h=4, hkv=2, d=8, dim=24, seed=0) -> tuple[Attention, ModelConfig]:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=dim, n_heads=h, n_kv_heads=hkv, head_dim=d, vocab_size=10)
    layer = Attention(cfg, 0).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer, cfg


def _inputs(cfg: ModelConfig, b=2, s=7):
    x = torch.randn(b, s, cfg.dim, dtype=torch.float64)
    pos = torch.arange(s).view(1, s).expand(b, s)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, None, 64)(pos, s, dtype=torch.float64)
    return x, cos, sin, AttentionContext()


def _reference_heads(layer: Attention, x, cos, sin) -> torch.Tensor:
    """Per-head outputs ``[B, S, H, D]`` of dense causal attention, float64, materialised scores."""
    from longreach.models.rope import apply_rotary

    b, s, _ = x.shape
    h, hkv, d = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = apply_rotary(layer.q_proj(x).view(b, s, h, d), cos, sin)
    k = apply_rotary(layer.k_proj(x).view(b, s, hkv, d), cos, sin).repeat_interleave(h // hkv, 2)
    v = layer.v_proj(x).view(b, s, hkv, d).repeat_interleave(h // hkv, 2)
    sc = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
    sc = sc.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", sc.softmax(-1), v)


def _same_fwd_bwd(want_layer, got_layer, x, cos, sin, ctx, *, rtol_out: float, rtol_grad: float) -> None:
    """Both layers on the same input: equal outputs, and equal input gradients for one random output gradient."""
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = want_layer(x1, cos, sin, ctx), got_layer(x2, cos, sin, ctx)
    torch.testing.assert_close(got, want, rtol=rtol_out, atol=1e-12)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=rtol_grad, atol=1e-12)


def test_moh_all_shared_equals_mha_forward_backward():
    layer, cfg = _dense()
    x, cos, sin, ctx = _inputs(cfg)
    moh = moh_from_dense(layer, n_shared=4, top_k=0)
    _same_fwd_bwd(layer, moh, x, cos, sin, ctx, rtol_out=1e-12, rtol_grad=1e-10)
    torch.testing.assert_close(moh.q_proj.weight.grad, layer.q_proj.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(moh.v_proj.weight.grad, layer.v_proj.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["router", "qnorm"])
def test_moh_exactly_k_routed_heads_and_gated_output(variant):
    layer, cfg = _dense(h=8, hkv=2, d=4, dim=16)
    x, cos, sin, ctx = _inputs(cfg, s=11)
    moh = moh_from_dense(layer, n_shared=3, top_k=2, variant=variant)
    for r in (moh.router_shared, moh.router_routed, moh.router_mix):
        if r is not None:
            torch.nn.init.normal_(r.weight, std=1.0)
    y = moh(x, cos, sin, ctx)
    g = moh.head_gates  # [B, S, H]
    assert torch.equal((g[..., 3:] != 0).sum(-1), torch.full(g.shape[:2], 2))
    assert bool((g[..., :3] > 0).all())
    if variant == "qnorm":
        assert set(g[..., 3:].unique().tolist()) <= {0.0, 1.0} and torch.equal(g[..., :3], torch.ones_like(g[..., :3]))
        assert moh.aux_loss is None
        # chosen routed heads are those with the largest pre-RoPE query norms
        b, s, _ = x.shape
        qn = layer.q_proj(x).view(b, s, 8, 4)[:, :, 3:].norm(dim=-1)
        assert torch.equal(g[..., 3:].bool(), torch.zeros_like(qn, dtype=torch.bool).scatter(-1, qn.topk(2, -1).indices, True))
    else:
        # two-stage weights: shared gates sum to a1·h_s, routed to a2·k, a1 + a2 = 2
        a = 2 * (x @ moh.router_mix.weight.t()).softmax(-1)
        torch.testing.assert_close(g[..., :3].sum(-1), 3 * a[..., 0])
        torch.testing.assert_close(g[..., 3:].sum(-1), 2 * a[..., 1])
        assert moh.aux_loss is not None and moh.aux_loss.requires_grad
    want = layer.o_proj((_reference_heads(layer, x, cos, sin) * g[..., None]).reshape(*x.shape[:2], -1))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)


def test_moh_balance_loss_equals_k_under_perfect_balance():
    r, k = 6, 2
    n = 12
    probs = torch.full((n, r), 1.0 / r)
    chosen = torch.stack([torch.tensor([(2 * t) % r, (2 * t + 1) % r]) for t in range(n)])  # each head 4 of 12 tokens
    assert balance_loss(probs, chosen).item() == pytest.approx(k)
    unbalanced = torch.tensor([[0, 1]] * n)
    assert balance_loss(probs, unbalanced).item() == pytest.approx(k)  # uniform P hides f (the loss needs P ∝ f)
    peaked = torch.tensor([[0.45, 0.45, 0.025, 0.025, 0.025, 0.025]] * n)
    assert balance_loss(peaked, unbalanced).item() > k


def test_moh_registered_in_model_and_convert_keeps_weights():
    cfg = ModelConfig(vocab_size=30, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, attention_type="moh",
                      moh=MoHOptions(shared=2, top_k=1))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.layers[0].self_attn, MoHAttention) and moh_config(cfg).n_routed == 2
    out = model(torch.randint(0, 30, (2, 8)))
    assert out.shape == (2, 8, 16) and model.aux_loss is not None
    dense = build_model(ModelConfig(vocab_size=30, dim=16, n_layers=2, n_heads=4, n_kv_heads=2)).double()
    ids = torch.randint(0, 30, (1, 8))
    y0 = dense(ids)
    assert convert_to_moh(dense, n_shared=4, top_k=0, variant="qnorm") == 2
    torch.testing.assert_close(dense(ids), y0, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="moh.top_k"):
        MoHConfig(dim=8, n_heads=4, n_kv_heads=1, head_dim=2, n_shared=2, top_k=3)
    with pytest.raises(ConfigError, match=r"moh.top_k must be in 1..2"):  # a config error, not a traceback
        build_model(dataclasses.replace(cfg, moh=MoHOptions(shared=2, top_k=3)))


def test_sqa_full_heads_equals_mha_and_fewer_heads_shapes():
    layer, cfg = _dense(h=4, hkv=2, d=6, dim=20)
    x, cos, sin, ctx = _inputs(cfg)
    sqa = SQAttention(SQAConfig(dim=20, n_q_heads=4, n_kv_heads=2, head_dim=6)).double()
    sqa.load_state_dict(layer.state_dict())
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = layer(x1, cos, sin, ctx), sqa(x2, cos, sin, ctx)
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-12)
    # H_q = 2 < H = 4: equals a dense layer whose heads are the kept ones
    small = SQAttention(SQAConfig(dim=20, n_q_heads=2, n_kv_heads=1, head_dim=6)).double()
    assert small.q_proj.weight.shape == (12, 20) and small.o_proj.weight.shape == (20, 12)
    ref_cfg = ModelConfig(dim=20, n_heads=2, n_kv_heads=1, head_dim=6, vocab_size=10)
    ref = Attention(ref_cfg, 0).double()
    ref.load_state_dict(small.state_dict())
    torch.testing.assert_close(small(x, cos, sin, ctx), ref(x, cos, sin, ctx), rtol=1e-12, atol=1e-12)
    model = build_model(ModelConfig(vocab_size=30, dim=16, n_layers=1, n_heads=4, attention_type="sqa",
                                    sqa=SQAOptions(q_heads=2, kv_heads=1)))
    assert model(torch.randint(0, 30, (1, 5))).shape == (1, 5, 16)


def _randomise_routers(moh: MoHAttention) -> None:
    for r in (moh.router_shared, moh.router_routed, moh.router_mix):
        if r is not None:
            torch.nn.init.normal_(r.weight, std=1.0)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("heads", [(8, 2, 3, 2), (6, 3, 0, 2), (4, 4, 2, 1)])
def test_moh_routed_execution_equals_masked_forward_backward(backend, heads):
    """Routed-only execution (shared heads one call, routed heads on gathered queries) equals computing
    every head and masking: output, input gradient and every parameter gradient (router included)."""
    import copy

    from longreach.attention import LocalAttention

    h, hkv, hs, k = heads
    torch.manual_seed(h + hs)
    cfg = MoHConfig(dim=24, n_heads=h, n_kv_heads=hkv, head_dim=8, n_shared=hs, top_k=k, execution="masked")
    masked = MoHAttention(cfg).double()
    _randomise_routers(masked)
    masked.inner_attention = LocalAttention(backend)
    routed = copy.deepcopy(masked)
    routed.cfg = dataclasses.replace(cfg, execution="routed")
    b, s = 2, 37
    x = torch.randn(b, s, 24, dtype=torch.float64)
    pos = torch.arange(s).view(1, s).expand(b, s)
    cos, sin = RotaryEmbedding(8, 10000.0, None, 64)(pos, s, dtype=torch.float64)
    ctx = AttentionContext(cu_seqlens=torch.tensor([0, 5, 6, 30, s]))  # packed documents, one of length 1
    _same_fwd_bwd(masked, routed, x, cos, sin, ctx, rtol_out=1e-10, rtol_grad=1e-9)
    for (name, p_r), p_m in zip(routed.named_parameters(), masked.parameters()):
        torch.testing.assert_close(p_r.grad, p_m.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_moh_routed_execution_computes_only_routed_pairs():
    """The routed heads' kernel calls see exactly the chosen (token, head) pairs: with documents (one call
    per routed head) Σ queries = B·S·k; with plain causal attention the (query, key) pairs computed cover
    the causal ones of the chosen queries and exceed them by less than one window per query."""
    from longreach.attention import LocalAttention
    from longreach.kernels import get_backend
    from longreach.mixtures.routed import WINDOW

    torch.manual_seed(5)
    cfg = MoHConfig(dim=16, n_heads=6, n_kv_heads=2, head_dim=4, n_shared=2, top_k=1)
    moh = MoHAttention(cfg).double()
    _randomise_routers(moh)
    moh.inner_attention = LocalAttention("reference")
    backend = get_backend("reference")
    calls: list[tuple[int, int]] = []  # (query, head) rows and keys of each call
    orig = backend.forward

    def spy(q, k, v, **kw):
        calls.append((q.shape[0] * q.shape[1] * q.shape[2], k.shape[1]))
        return orig(q, k, v, **kw)

    b, s = 2, 2 * WINDOW + 9
    x = torch.randn(b, s, 16, dtype=torch.float64)
    pos = torch.arange(s).view(1, s).expand(b, s)
    cos, sin = RotaryEmbedding(4, 10000.0, None, 2 * s)(pos, s, dtype=torch.float64)
    backend.forward = spy
    try:
        moh(x, cos, sin, AttentionContext(cu_seqlens=torch.tensor([0, s])))  # one document: not plain causal
        documents, calls[:] = list(calls), []
        moh(x, cos, sin, AttentionContext())
    finally:
        backend.forward = orig
    # first the one dense call of the 2 shared heads (their GQA group of 3 query heads), then the routed heads
    assert documents[0] == (b * s * 3, s)
    assert sum(rows for rows, _ in documents[1:]) == b * s * cfg.top_k == int(moh.routed_active.sum())
    routed_pos = moh.routed_active.nonzero()[:, 1]  # position of every chosen (token, head) pair
    needed = int((routed_pos + 1).sum())  # causal keys of each chosen query
    computed = sum(rows * keys for rows, keys in calls[1:])
    assert needed <= computed < needed + routed_pos.numel() * WINDOW
    assert computed < 0.6 * b * cfg.n_routed * s * (s + 1) / 2  # far below every routed head computed densely


def test_moh_routed_under_every_cp_strategy():
    from longreach.testing import run_ranks
    from workers.moe import moh_routed_under_cp

    cases = [dict(strategy=st, layout=lay) for st in ("ring", "ulysses", "allgather") for lay in ("zigzag", "stripe")]
    cases += [dict(strategy="hybrid", layout="zigzag", ulysses_degree=2),
              dict(strategy="ring", layout="contiguous", docs=True, variant="qnorm")]
    failures = [f for r in run_ranks(moh_routed_under_cp, 4, args=(cases,)) for f in r]
    assert not failures, "\n".join(failures)
