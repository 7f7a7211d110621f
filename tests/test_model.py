"""Llama model against a hand-written float64 reference; RoPE scaling against the papers' formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longreach.attention import AttentionContext, LocalAttention
from longreach.models import FFN_TYPES, ModelConfig, build_model, register_ffn
from longreach.models.rope import apply_rotary, rope_frequencies


# ------------------------------------------------------------------------------------ explicit reference
def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate(x, pos, theta):
    """Rotate pairs (j, j + d/2) of x [B, S, H, D] by pos·theta^(-2j/d), written out per pair."""
    d = x.shape[-1]
    out = x.clone()
    for j in range(d // 2):
        ang = pos.double() * theta ** (-2.0 * j / d)  # [B, S]
        c, s = torch.cos(ang)[..., None], torch.sin(ang)[..., None]
        a, b = x[..., j], x[..., j + d // 2]
        out[..., j] = a * c - b * s
        out[..., j + d // 2] = b * c + a * s
    return out


def reference_forward(params: dict[str, torch.Tensor], cfg: ModelConfig, ids, pos, allowed):
    """Plain-op Llama: ``allowed`` [B, S, S] says which keys each query sees."""
    h = params["embed_tokens.weight"][ids]  # [B, S, dim]
    b, s, _ = h.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    for i in range(cfg.n_layers):
        p = lambda n: params[f"layers.{i}.{n}"]  # noqa: E731
        x = _rms(h, p("input_layernorm.weight"), cfg.norm_eps)
        q = (x @ p("self_attn.q_proj.weight").T).view(b, s, nh, hd)
        k = (x @ p("self_attn.k_proj.weight").T).view(b, s, nkv, hd)
        v = (x @ p("self_attn.v_proj.weight").T).view(b, s, nkv, hd)
        q, k = _rotate(q, pos, cfg.rope_theta), _rotate(k, pos, cfg.rope_theta)
        k = k.repeat_interleave(nh // nkv, dim=2)
        v = v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        att = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v).reshape(b, s, nh * hd)
        a = att @ p("self_attn.o_proj.weight").T
        mlp = lambda y: (F.silu(y @ p("mlp.gate_proj.weight").T) * (y @ p("mlp.up_proj.weight").T)) @ p(  # noqa: E731
            "mlp.down_proj.weight").T
        if cfg.parallel_block:
            h = h + a + mlp(x)
        else:
            h = h + a
            h = h + mlp(_rms(h, p("post_attention_layernorm.weight"), cfg.norm_eps))
    return _rms(h, params["norm.weight"], cfg.norm_eps)


def _causal(b, s):
    return torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)


CASES = [
    dict(tie_embeddings=False, parallel_block=False, n_kv_heads=2),
    dict(tie_embeddings=True, parallel_block=False, n_kv_heads=1),
    dict(tie_embeddings=False, parallel_block=True, n_kv_heads=4),
]


@pytest.mark.parametrize("over", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_forward_backward_matches_reference(over):
    cfg = ModelConfig(vocab_size=41, dim=32, n_layers=2, n_heads=4, ffn_hidden=40, rope_theta=500.0, **over)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    for m in model.modules():
        if hasattr(m, "inner_attention"):
            m.inner_attention = LocalAttention("reference")
    for n, p in model.named_parameters():
        if n.endswith("norm.weight"):  # non-trivial norm weights
            nn.init.uniform_(p, 0.5, 1.5)
    b, s = 2, 13
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    labels = torch.randint(0, cfg.vocab_size, (b, s))
    labels[0, 3] = -100
    pos = torch.arange(s).expand(b, s)

    hidden = model(ids, pos, AttentionContext())
    loss_sum, n = model(ids, pos, AttentionContext(), labels=labels, loss_chunk_size=5)
    loss_sum.backward()

    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in params
    ref_h = reference_forward(params, cfg, ids, pos, _causal(b, s))
    out_w = params["embed_tokens.weight"] if cfg.tie_embeddings else params["lm_head.weight"]
    ref_loss = F.cross_entropy(ref_h.reshape(-1, cfg.dim) @ out_w.T, labels.reshape(-1), reduction="sum",
                               ignore_index=-100)
    ref_loss.backward()
    torch.testing.assert_close(hidden, ref_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_sum, ref_loss, rtol=1e-10, atol=1e-10)
    assert int(n) == b * s - 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-8, atol=1e-10, msg=name)


def test_packed_documents_and_cpu_backend():
    """Per-document positions and a cu_seqlens mask (float64 reference) — and the float32 cpu backend."""
    cfg = ModelConfig(vocab_size=29, dim=24, n_layers=2, n_heads=3, n_kv_heads=1, ffn_hidden=32)
    torch.manual_seed(1)
    model = build_model(cfg).double()
    b, s = 2, 11
    cu = torch.tensor([0, 4, 5, 11])  # includes a single-token document
    doc = torch.searchsorted(cu, torch.arange(s), right=True) - 1
    pos = (torch.arange(s) - cu[doc]).expand(b, s)
    allowed = ((doc[:, None] == doc[None, :]) & _causal(1, s)[0]).expand(b, s, s)
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    want = reference_forward(params, cfg, ids, pos, allowed)
    ctx = AttentionContext(cu_seqlens=cu)
    for m in model.modules():
        if hasattr(m, "inner_attention"):
            m.inner_attention = LocalAttention("reference")
    torch.testing.assert_close(model(ids, pos, ctx), want, rtol=1e-10, atol=1e-10)
    # per-row documents (tuple of cu_seqlens): row 1 is one document
    ctx_rows = AttentionContext(cu_seqlens=(cu, torch.tensor([0, s])))
    pos_rows = torch.stack([pos[0], torch.arange(s)])
    allowed_rows = torch.stack([allowed[0], _causal(1, s)[0]])
    torch.testing.assert_close(model(ids, pos_rows, ctx_rows),
                               reference_forward(params, cfg, ids, pos_rows, allowed_rows), rtol=1e-10, atol=1e-10)
    # cpu backend, float32
    m32 = build_model(cfg)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for m in m32.modules():
        if hasattr(m, "inner_attention"):
            m.inner_attention = LocalAttention("cpu")
    torch.testing.assert_close(m32(ids, pos, ctx).double(), want, rtol=2e-4, atol=2e-4)


def test_aux_losses_are_summed():
    @register_ffn("_test_aux")
    class AuxFFN(nn.Module):
        def __init__(self, cfg, layer_idx):
            super().__init__()
            self.lin = nn.Linear(cfg.dim, cfg.dim, bias=False)
            self.layer_idx = layer_idx

        def forward(self, x):
            self.aux_loss = (self.layer_idx + 1) * self.lin.weight.square().sum()
            return self.lin(x)

    try:
        cfg = ModelConfig(vocab_size=11, dim=8, n_layers=3, n_heads=2, ffn_type="_test_aux")
        model = build_model(cfg)
        model(torch.randint(0, 11, (1, 5)))
        want = sum((i + 1) * model.layers[i].mlp.lin.weight.square().sum() for i in range(3))
        torch.testing.assert_close(model.aux_loss, want)
    finally:
        FFN_TYPES.pop("_test_aux")


def test_unknown_registry_names_are_clear():
    with pytest.raises(ValueError, match="model.arch='nope'"):
        build_model(ModelConfig(arch="nope", vocab_size=11, dim=8, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="model.ffn_type='nope'"):
        build_model(ModelConfig(ffn_type="nope", vocab_size=11, dim=8, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)


# ------------------------------------------------------------------------------------ RoPE scaling
D, THETA, L = 16, 10000.0, 64


def _base():
    return [THETA ** (-2 * i / D) for i in range(D // 2)]


def _close(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_rope_default_linear_ntk():
    f, a = rope_frequencies(D, THETA, None, max_seq_len=L)
    _close(f, _base())
    assert a == 1.0
    f, _ = rope_frequencies(D, THETA, {"type": "linear", "factor": 4.0}, max_seq_len=L)
    _close(f, [t / 4 for t in _base()])
    f, _ = rope_frequencies(D, THETA, {"type": "ntk", "factor": 4.0}, max_seq_len=L)
    b2 = THETA * 4.0 ** (D / (D - 2))
    _close(f, [b2 ** (-2 * i / D) for i in range(D // 2)])


def test_rope_dynamic():
    sc = {"rope_type": "dynamic", "factor": 2.0}
    f, _ = rope_frequencies(D, THETA, sc, max_seq_len=L, seq_len=L)
    _close(f, _base())  # unchanged up to L
    cur = 3 * L
    b2 = THETA * ((2.0 * cur / L) - 1.0) ** (D / (D - 2))
    f, _ = rope_frequencies(D, THETA, sc, max_seq_len=L, seq_len=cur)
    _close(f, [b2 ** (-2 * i / D) for i in range(D // 2)])


def test_rope_yarn():
    s = 8.0
    f, att = rope_frequencies(D, THETA, {"type": "yarn", "factor": s, "original_max_position_embeddings": 4096},
                              max_seq_len=L)
    # the reference YaRN form (transformers'): a ramp over pair indices between the indices where the
    # rotation count L·θ_i/2π equals β_fast = 32 and β_slow = 1, rounded outwards
    low = math.floor(D * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(THETA)))
    high = math.ceil(D * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(THETA)))
    want = []
    for i, t in enumerate(_base()):
        gamma = 1.0 - min(1.0, max(0.0, (i - low) / (high - low)))
        want.append(t * gamma + (t / s) * (1 - gamma))
    _close(f, want)
    assert att == pytest.approx(0.1 * math.log(s) + 1)
    # both ends of the ramp are exercised
    assert any(abs(w - t) < 1e-15 for w, t in zip(want, _base())) and any(
        abs(w - t / s) < 1e-15 for w, t in zip(want, _base()))


def test_rope_llama3():
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    f, _ = rope_frequencies(D, 500000.0, sc, max_seq_len=L)
    want = []
    for i in range(D // 2):
        t = 500000.0 ** (-2 * i / D)
        lam = 2 * math.pi / t
        if lam < 8192 / 4.0:
            want.append(t)
        elif lam > 8192 / 1.0:
            want.append(t / 8.0)
        else:
            sm = (8192 / lam - 1.0) / (4.0 - 1.0)
            want.append((1 - sm) * t / 8.0 + sm * t)
    _close(f, want)


def test_rope_attention_factor_and_rotation():
    x = torch.randn(1, 3, 2, D, dtype=torch.float64)
    pos = torch.tensor([[0, 5, 1000]])
    model = build_model(ModelConfig(vocab_size=11, dim=2 * D, n_layers=1, n_heads=2,
                                    rope_scaling={"type": "yarn", "factor": 4.0}, max_seq_len=L))
    cos, sin = model.rotary(pos, dtype=torch.float64)
    att = 0.1 * math.log(4.0) + 1
    # rotation keeps the norm up to the attention factor, and position 0 only scales
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), att * x.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(x, cos, sin)[:, 0], att * x[:, 0])
