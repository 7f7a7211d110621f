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
@pytest.mark.parametrize("heads", [(8, 2, 3, 2), (8, 2, 4, 2), (6, 3, 0, 2), (4, 4, 2, 1), (8, 8, 2, 6)])
@pytest.mark.parametrize("documents", [True, False])
def test_moh_routed_execution_equals_masked_forward_backward(backend, heads, documents, monkeypatch):
    """Routed-only execution (shared heads one call, routed heads on gathered queries) equals computing
    every head and masking: output, input gradient and every parameter gradient (router included). Packed
    documents run one block per (row, head) with the mask placed; plain causal attention runs the windowed
    block plan, with tiny windows so that coarse blocks, window blocks and causal tiles all run. Heads: GQA
    with routed heads off a group boundary (gathered K/V heads) and on it, all heads routed, MHA, and every
    routed head active."""
    import copy

    from longreach.attention import LocalAttention
    from longreach.mixtures import routed as routed_mod

    monkeypatch.setattr(routed_mod, "WINDOW", 8)
    monkeypatch.setattr(routed_mod, "COARSE_ROWS", 6)
    h, hkv, hs, k = heads
    torch.manual_seed(h + hs + k)
    cfg = MoHConfig(dim=24, n_heads=h, n_kv_heads=hkv, head_dim=8, n_shared=hs, top_k=k, execution="masked")
    masked = MoHAttention(cfg).double()
    _randomise_routers(masked)
    masked.inner_attention = LocalAttention(backend)
    routed = copy.deepcopy(masked)
    routed.cfg = dataclasses.replace(cfg, execution="routed")
    b, s = 2, 45
    x = torch.randn(b, s, 24, dtype=torch.float64)
    pos = torch.arange(s).view(1, s).expand(b, s)
    cos, sin = RotaryEmbedding(8, 10000.0, None, 64)(pos, s, dtype=torch.float64)
    # packed documents, one of length 1
    ctx = AttentionContext(cu_seqlens=torch.tensor([0, 5, 6, 30, s]) if documents else None)
    _same_fwd_bwd(masked, routed, x, cos, sin, ctx, rtol_out=1e-10, rtol_grad=1e-9)
    for (name, p_r), p_m in zip(routed.named_parameters(), masked.parameters()):
        torch.testing.assert_close(p_r.grad, p_m.grad, rtol=1e-9, atol=1e-12, msg=name)


def _routed_reference(q, k, v, active, first_head: int, num_heads: int) -> torch.Tensor:
    """Dense causal attention of every routed head in float64 (materialised scores), zero where not active."""
    s = q.shape[1]
    kv = (first_head + torch.arange(q.shape[2])) // (num_heads // k.shape[2])  # [R] key/value head per query head
    sc = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv]) / q.shape[-1] ** 0.5
    sc = sc.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", sc.softmax(-1), v[:, :, kv]) * active[..., None]


@pytest.mark.parametrize("min_fill", [0.0, 1.0])
@pytest.mark.parametrize("first_head,num_heads,kv_heads", [(2, 6, 3), (1, 5, 1), (3, 7, 7)])
def test_routed_attention_uneven_empty_and_full_heads(first_head, num_heads, kv_heads, min_fill, monkeypatch):
    """routed_attention on a hand-made routing: a head with no token, a head with every token, uneven counts,
    B=2 with different routings per row; with every window padded into one block (min fill 0) and with a
    block per (row, head) (min fill 1), output and dq, dk, dv equal the float64 dense reference, and
    unrouted pairs are exactly zero."""
    from longreach.attention import LocalAttention
    from longreach.mixtures import routed as routed_mod

    monkeypatch.setattr(routed_mod, "WINDOW", 8)
    monkeypatch.setattr(routed_mod, "COARSE_ROWS", 10)
    monkeypatch.setattr(routed_mod, "MIN_FILL", min_fill)
    torch.manual_seed(first_head)
    b, s, d, r = 2, 53, 8, num_heads - first_head
    g = torch.Generator().manual_seed(3)
    active = torch.rand(b, s, r, generator=g) < torch.linspace(0.1, 0.7, r)  # uneven per head
    active[:, :, 0] = False  # nobody routed to the first routed head
    active[0, :, -1] = True  # every token of row 0 routed to the last
    q = torch.randn(b, s, r, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, s, kv_heads, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, s, kv_heads, d, dtype=torch.float64, requires_grad=True)
    got = routed_mod.routed_attention(q, k, v, active, first_head=first_head, num_heads=num_heads,
                                      inner=LocalAttention("auto"), ctx=AttentionContext())
    want = _routed_reference(q, k, v, active, first_head, num_heads)
    assert bool((got[~active] == 0).all())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    dout = torch.randn_like(want)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    for name, g_got, g_want in zip("qkv", grads, torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12, msg=f"d{name}")
    none = routed_mod.routed_attention(q, k, v, torch.zeros_like(active), first_head=first_head, num_heads=num_heads,
                                       inner=LocalAttention("auto"), ctx=AttentionContext())
    assert bool((none == 0).all()) and all(bool((g == 0).all()) for g in torch.autograd.grad(none, (q, k, v), dout))


@pytest.mark.parametrize("skewed", [False, True])
def test_plan_blocks_cover_each_routed_pair_and_its_causal_keys_once(skewed):
    """The block plan: every routed pair is a valid row of exactly one window block and at most one coarse
    block; padded rows lie in the block's window; for each pair the blocks' unmasked key ranges and tile
    partition [0, last of its window] with no overlap; the pairs computed (padding included) stay close to the
    causal count, with balanced routing (padded blocks) and with one (row, head) taking every token and one
    head none (a block per (row, head) where padding would waste too much)."""
    from longreach.mixtures.routed import plan_blocks

    b, s, r, width = 2, 600, 4, 64
    g = torch.Generator().manual_seed(0)
    if skewed:
        active = torch.rand(b, s, r, generator=g) < torch.tensor([0.05, 0.3, 0.0, 0.6])
        active[1, :, 2] = True
    else:
        active = torch.zeros(b, s, r, dtype=torch.bool).scatter(2, torch.rand(b, s, r, generator=g).topk(
            2, dim=-1).indices, True)  # top-2 of 4: each head about half the tokens
    blocks = plan_blocks(active, torch.arange(s), causal=True, row_masks=[], width=width, coarse_rows=100)
    pairs = torch.nonzero(active.reshape(-1)).view(-1)
    n = pairs.numel()
    in_window, in_coarse = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    covered: dict[int, list[tuple[int, int]]] = {}  # pair -> key position ranges [lo, hi)
    computed = 0
    for blk in blocks:
        bq, rows, rq = blk.tokens.shape
        heads = torch.arange(blk.heads.start, blk.heads.stop)
        assert bool(active[blk.rows][torch.arange(bq).view(-1, 1, 1), blk.tokens, heads][blk.valid].all())
        lo_pos, hi_pos = int(blk.q_pos.min()), int(blk.q_pos.max())
        if blk.tile is not None:
            assert blk.tile[0] <= lo_pos and hi_pos <= blk.tile[1] and blk.keys[1] == blk.tile[0]
            in_window[blk.dst] += 1
        else:
            in_coarse[blk.dst] += 1
        assert blk.keys[1] <= lo_pos  # unmasked keys all precede every query row (padding included)
        ranges = [blk.keys] + ([(blk.tile[0], blk.tile[1] + 1)] if blk.tile else [])
        for i in blk.dst.tolist():
            covered.setdefault(i, []).extend(ranges)
        computed += bq * rows * rq * sum(hi - lo for lo, hi in ranges)
    assert bool((in_window == 1).all()) and int(in_coarse.max()) <= 1 and int(in_coarse.sum()) > 0
    flat_pos = (pairs // r) % s
    needed = 0
    for i, ranges in covered.items():
        spans = sorted(ranges)
        assert spans[0][0] == 0 and all(a[1] == c[0] for a, c in zip(spans, spans[1:]))  # contiguous, disjoint
        assert spans[-1][1] > int(flat_pos[i])  # reaches the query itself
        needed += int(flat_pos[i]) + 1
    assert needed <= computed < 1.35 * needed


@pytest.mark.parametrize("world_size", [2, 4])
def test_moh_routed_under_every_cp_strategy(world_size):
    """Routed heads under ring, Ulysses, hybrid and all-gather at 2 and 4 ranks equal single-rank routed and
    masked (output, dx, every parameter gradient); under Ulysses (no point-to-point traffic of its own) every
    message is one K/V chunk or dK/dV accumulator of S/P tokens of the key/value heads the routed heads read,
    and nothing is all-gathered: the routed heads never hold the whole sequence's K/V."""
    from longreach.testing import run_ranks
    from workers.moh import routed_under_cp

    if world_size == 4:
        cases = [dict(strategy=st, layout=lay)
                 for st in ("ring", "ulysses", "allgather") for lay in ("zigzag", "stripe")]
        cases += [dict(strategy="hybrid", layout="zigzag", ulysses_degree=2),
                  dict(strategy="ring", layout="contiguous", docs=True, variant="qnorm"),
                  dict(strategy="hybrid", layout="zigzag", ulysses_degree=2, small=True),
                  dict(strategy="ring", layout="zigzag", small=True, shared=3),
                  dict(strategy="ulysses", layout="stripe", small=True, backend="auto")]
    else:
        cases = [dict(strategy="ring", layout="zigzag", small=True),
                 dict(strategy="allgather", layout="stripe", small=True, backend="auto"),
                 dict(strategy="ring", layout="contiguous", docs=True)]
    cases += [dict(strategy="ulysses", layout="contiguous", small=True), dict(strategy="ulysses", layout="zigzag")]
    results = run_ranks(routed_under_cp, world_size, args=(cases,))
    failures = [f for fails, _ in results for f in fails]
    assert not failures, "\n".join(failures)
    b, chunk, kv_read, width = 2, 12, 1, 12  # B, S/P rows, K/V heads of routed heads 4..7 (GQA 4), D+E
    for rank, (_, comms) in enumerate(results):
        for case, (ops, gathers) in zip(cases, comms):
            if case["strategy"] != "ulysses":
                continue
            sizes = sorted({nbytes for _, nbytes in ops})
            assert gathers == 0 and sizes == [b * chunk * kv_read * width * 8], (rank, case, sizes, gathers)
            # forward: P-1 K/V chunks in; backward: P-1 K/V chunks and P dK/dV accumulators in
            assert sum(kind == "recv" for kind, _ in ops) == 3 * world_size - 2, (rank, case, ops)


def test_bench_mixtures_only_times_the_chosen_rows_and_their_partners(tmp_path, capsys):
    """``bench mixtures --only``: just the named rows and their dense partners; a fragment naming no row is a
    user error (exit 2) that lists the rows."""
    import json

    from longreach.launchers import cli

    tiny = ["--seq-len", "24", "--dim", "16", "--heads", "4", "--kv-heads", "2", "--head-dim", "4", "--moh-shared", "1",
            "--moh-top-k", "1", "--moe-experts", "4", "--ffn-hidden", "8", "--rounds", "1", "--clock", "cpu"]
    out = tmp_path / "rows.json"
    assert cli.main(["bench", "mixtures", *tiny, "--only", "moh core", "--json", str(out)]) == 0
    rows = {r["layer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense attn core H=4", "moh core (2 of 4 heads active)"}
    assert rows["moh core (2 of 4 heads active)"]["fwd_bwd_ratio"] > 0
    capsys.readouterr()
    assert cli.main(["bench", "mixtures", *tiny, "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--only" in err and "moh core" in err and "Traceback" not in err
