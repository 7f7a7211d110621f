"""TransNormerLLM: decay schedule, layers against hand-written formulas, hybrid stacks, LASP training."""
import math

import pytest
import torch

from longreach.attention import AttentionContext
from longreach.kernels import lightning_attention
from longreach.models import ModelConfig, build_model
from longreach.models.transnormer import (LinearTokenMixer, SimpleRMSNorm, TransNormerLLM, alibi_slopes,
                                          tnl_decay)
from longreach.testing import run_ranks
from workers.lasp import tnl_recipe_runs


def _cfg(**kw) -> ModelConfig:
    base = dict(arch="transnormer", vocab_size=40, dim=16, n_layers=3, n_heads=2, ffn_hidden=24)
    return ModelConfig(**(base | kw))


def test_decay_schedule():
    d0 = tnl_decay(8, 0, 4)
    assert torch.allclose(d0, torch.tensor([2.0 ** -(i + 1) for i in range(8)]) * (1 + 1e-5))
    assert torch.allclose(tnl_decay(8, 3, 4), torch.tensor([2.0 ** -(i + 1) for i in range(8)]) * 1e-5)
    assert torch.allclose(tnl_decay(4, 1, 3), torch.tensor([2.0 ** (-2 * (i + 1)) for i in range(4)]) * (0.5 + 1e-5))
    assert torch.isfinite(tnl_decay(4, 0, 1)).all() and (tnl_decay(4, 0, 1) > 0).all()  # L = 1 guarded
    # non power of two: slopes of 4 heads, then every other slope of 8 heads
    assert alibi_slopes(6) == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]


def test_simple_rms_norm():
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(SimpleRMSNorm()(x), want)
    assert not list(SimpleRMSNorm().parameters())


def test_token_mixer_matches_formula():
    torch.manual_seed(0)
    cfg = _cfg(n_layers=2)
    mixer = LinearTokenMixer(cfg, 0).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    pos = torch.arange(11)[None].expand(2, 11)
    q, k, v, u = (x @ mixer.qkvu_proj.weight.T).chunk(4, -1)
    silu = lambda t: t * torch.sigmoid(t)  # noqa: E731
    shape = (2, 11, 2, 8)
    decay = tnl_decay(2, 0, 2).double()  # the float32 buffer the layer holds
    assert torch.allclose(decay, torch.tensor(alibi_slopes(2), dtype=torch.float64) * (1 + 1e-5))
    o = lightning_attention(silu(q).view(shape), silu(k).view(shape), v.reshape(shape), decay, backend="naive")
    o = o.reshape(2, 11, 16)
    want = (u * (o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6))) @ mixer.out_proj.weight.T
    assert torch.allclose(mixer(x, pos), want, rtol=1e-10, atol=1e-12)


def test_lrpe_is_relative():
    # decay and LRPE both depend on i - j only: shifting every position leaves the output unchanged
    torch.manual_seed(1)
    mixer = LinearTokenMixer(_cfg(extra={"lrpe": True}), 1).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    pos = torch.arange(9)[None]
    a, b = mixer(x, pos), mixer(x, pos + 1000)
    assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    c = mixer(x, pos * 2)
    assert not torch.allclose(a, c, rtol=1e-3)


def test_hybrid_stack_and_interface():
    cfg = _cfg(n_layers=4, extra={"softmax_every": 2, "lrpe": True})
    model = build_model(cfg)
    assert isinstance(model, TransNormerLLM)
    kinds = ["softmax" if layer.softmax else "linear" for layer in model.layers]
    assert kinds == ["linear", "softmax", "linear", "softmax"]
    assert [layer.softmax for layer in build_model(_cfg(extra={"softmax_layers": [0]})).layers] == [True, False, False]
    ids = torch.randint(0, 40, (2, 13))
    hidden = model(ids)
    assert hidden.shape == (2, 13, 16)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    loss_sum, n = model(ids, labels=labels)
    assert int(n) == 24 and math.isfinite(float(loss_sum.detach()))
    loss_sum.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.output_weight().shape == (40, 16)


def test_causal():
    model = build_model(_cfg(extra={"softmax_layers": [1], "lrpe": True})).double()
    ids = torch.randint(0, 40, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8:] = (ids2[0, 8:] + 1) % 40
    assert torch.allclose(model(ids)[:, :8], model(ids2)[:, :8], rtol=1e-10, atol=1e-12)


def test_bad_extra_option():
    with pytest.raises(ValueError, match="softmax_every"):
        build_model(_cfg(extra={"softmax_evry": 2}))
    with pytest.raises(ValueError, match="softmax_layers"):
        build_model(_cfg(extra={"softmax_layers": [5]}))


def _recipe(out_dir, cp: int, variant: str, layout: str) -> list[str]:
    return [f"--run.out_dir={out_dir}", "--run.steps=8", "--run.save_every=0", "--run.log_every=4",
            "--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--model.ffn_hidden=64",
            "--model.vocab_size=37", "--model.max_seq_len=64", "--train.seq_len=64", "--train.warmup_steps=2",
            "--train.lr=1e-2", f"--parallel.cp={cp}", f"--parallel.linear_variant={variant}",
            f"--parallel.layout={layout}"]


def test_pretraining_recipe_two_ranks_lasp_equals_one_rank(tmp_path):
    # the shipped tiny recipe through the real trainer: cp=2 with LASP-2 (zigzag) and LASP-1 (contiguous),
    # and a hybrid stack (softmax layers on the ring strategy, linear layers on LASP-2, one zigzag layout)
    # last run of each: packed documents (two per row), linear layers resetting their state at the boundary
    hybrid = ["--model.extra={softmax_every: 2, lrpe: true}", "--attention.backend=reference"]
    one = tnl_recipe_runs(0, 1, [_recipe(tmp_path / "one", 1, "lasp2", "contiguous"),
                                 _recipe(tmp_path / "one_h", 1, "lasp2", "contiguous") + hybrid,
                                 _recipe(tmp_path / "one_d", 1, "lasp2", "contiguous")],
                          documents=[False, False, True])
    runs = [_recipe(tmp_path / "lasp2", 2, "lasp2", "zigzag"), _recipe(tmp_path / "lasp1", 2, "lasp1", "contiguous"),
            _recipe(tmp_path / "hybrid", 2, "lasp2", "zigzag") + hybrid,
            _recipe(tmp_path / "lasp2_d", 2, "lasp2", "zigzag")]
    two = run_ranks(tnl_recipe_runs, 2, args=(runs,), kwargs={"documents": [False, False, False, True]})[0]
    for curve in one:
        assert len(curve) == 8 and curve[-1] < 0.9 * curve[0], f"loss did not fall: {curve}"
    assert one[0] != one[1] and one[0] != one[2]  # the hybrid stack is a different model; documents other data
    for curve, want in zip(two, [one[0], one[0], one[1], one[2]]):
        assert torch.allclose(torch.tensor(curve), torch.tensor(want), rtol=1e-5), (curve, want)


def _documents_alone(model, ids: torch.Tensor, cu_rows: list[torch.Tensor]) -> torch.Tensor:
    """Hidden states of each document of each row run through ``model`` on its own, concatenated."""
    rows = []
    for row in range(ids.shape[0]):
        edges = cu_rows[row if len(cu_rows) > 1 else 0].tolist()
        rows.append(torch.cat([model(ids[row:row + 1, a:e]) for a, e in zip(edges[:-1], edges[1:])], dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("softmax_layers", [[], [1]])
def test_packed_documents_equal_each_document_alone(softmax_layers):
    # TransNormerLLM on packed rows (the context the trainer builds: global offsets, per-document positions)
    # equals each document on its own; the linear layers reset their state, the softmax ones mask documents
    torch.manual_seed(2)
    model = build_model(_cfg(extra={"softmax_layers": softmax_layers, "lrpe": True})).double()
    ids = torch.randint(0, 40, (2, 13))
    for cu in (torch.tensor([0, 1, 6, 13]), (torch.tensor([0, 13]), torch.tensor([0, 4, 13]))):
        rows = list(cu) if isinstance(cu, tuple) else [cu] * 2
        pos = torch.stack([torch.cat([torch.arange(e - a) for a, e in zip(r[:-1].tolist(), r[1:].tolist())])
                           for r in rows])  # [B, S] restart per document
        ctx = AttentionContext(seq_len=13, positions=torch.arange(13), cu_seqlens=cu)
        got = model(ids, pos, ctx)
        want = _documents_alone(model, ids, rows)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), float((got - want).abs().max())
        assert not torch.allclose(got, model(ids, pos), rtol=1e-3)  # without documents the state crosses
