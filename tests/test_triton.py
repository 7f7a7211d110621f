"""The Triton block-sparse flash kernel against the float64 reference: out, LSE and all gradients.

Without CUDA the kernels run in Triton's interpreter (≤ 256 tokens, float32/float16)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from longreach.kernels import attention, get_backend  # noqa: E402
from longreach.kernels import masks as M  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def compare(mask, *, sq, sk=None, h=4, hkv=2, d=16, e=16, dtype=torch.float32, tol=2e-5, b=1):
    sk = sq if sk is None else sk
    torch.manual_seed(0)
    q = torch.randn(b, sq, h, d, dtype=dtype, device=DEV)
    k = torch.randn(b, sk, hkv, d, dtype=dtype, device=DEV)
    v = torch.randn(b, sk, hkv, e, dtype=dtype, device=DEV)
    ref, tri = get_backend("reference"), get_backend("triton")
    o1, l1 = ref.forward(q.double(), k.double(), v.double(), mask=mask, scale=None)
    o2, l2 = tri.forward(q, k, v, mask=mask, scale=None)
    do = torch.randn_like(o1)
    g1 = ref.backward(do, q.double(), k.double(), v.double(), o1, l1, mask=mask, scale=None)
    g2 = tri.backward(do.to(dtype), q, k, v, o1.to(dtype), l1.float(), mask=mask, scale=None)
    fails = []
    if l2.dtype != torch.float32 or o2.dtype != dtype:
        fails.append(f"dtypes {o2.dtype} {l2.dtype}")
    if not torch.equal(torch.isneginf(l1), torch.isneginf(l2)):
        fails.append("-inf rows differ")
    fin = torch.isfinite(l1)
    for name, a, bb in [("out", o1, o2), ("lse", l1[fin], l2[fin]), ("dq", g1[0], g2[0]), ("dk", g1[1], g2[1]),
                        ("dv", g1[2], g2[2])]:
        if not torch.isfinite(bb).all():
            fails.append(f"{name} not finite")
            continue
        err = (a - bb.double()).abs().max().item() if a.numel() else 0.0
        if err > tol * max(1.0, a.abs().max().item() if a.numel() else 0.0):
            fails.append(f"{name} err {err:.2e}")
    return fails


CASES = [
    ("causal GQA odd", M.causal(), dict(sq=63, h=4, hkv=2)),
    ("s2 roll per-head", M.s2(50, "roll"), dict(sq=200, h=4, hkv=4, d=20, e=12)),
    ("sf, Sq<Sk", M.sf(64, 4), dict(sq=63, sk=128, h=6, hkv=2)),
    ("ssa fp16", M.ssa(0.4, window=1, block=16, seed=1).at(step=2, layer=0), dict(sq=100, h=4, hkv=1,
                                                                                  dtype=torch.float16, tol=3e-3)),
    ("power + documents", M.power(8) & M.documents([0, 1, 50, 120]), dict(sq=120, h=2, hkv=1, b=2)),
    ("fully masked rows", M.sliding_window(4) & M.sinks(6), dict(sq=70, h=2, hkv=2)),
    ("full (no mask)", None, dict(sq=40, sk=72, h=2, hkv=1)),
]


def test_triton_matches_reference():
    failures = []
    for label, mask, kw in CASES:
        failures += [f"{label}: {f}" for f in compare(mask, **kw)]
    assert not failures, failures


def test_triton_autograd_and_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 48, 2, 16, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = M.sliding_window(9)
    out = attention(q, k, v, mask=mask, backend="triton")
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_r = attention(qd, kd, vd, mask=mask, backend="reference")
    grads_r = torch.autograd.grad(out_r.square().sum(), (qd, kd, vd))
    torch.testing.assert_close(out.double(), out_r, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a.double(), b, rtol=5e-2, atol=5e-2)
    with pytest.raises(ValueError, match="float64"):
        get_backend("triton").forward(qd, kd, vd, mask=mask, scale=None)


def test_triton_plan_skips_empty_tiles():
    from longreach.kernels.blocksparse._plan import build_plan

    n = 256
    placed = M.sliding_window(32).place(torch.arange(n), torch.arange(n), seq_len=n)
    plan = build_plan(placed, n, n, 2, 32, 32, with_partial=True)
    assert plan.row_count.tolist() == [[1] + [2] * 7]  # diagonal tile + the one before it
    assert plan.partial_mask.shape[0] == int((plan.kind == 1).sum())
    # the listed tiles are exactly the non-empty ones, ascending
    for qt in range(8):
        listed = plan.row_list[0, qt, : plan.row_count[0, qt]].tolist()
        assert listed == (plan.kind[0, qt] != 0).nonzero().reshape(-1).tolist()


@pytest.mark.gpu
def test_triton_gpu_long_bf16():
    failures = compare(M.sf(512, 4), sq=2048, h=8, hkv=2, d=64, e=64, dtype=torch.bfloat16, tol=3e-2)
    failures += compare(M.s2(512, "roll"), sq=2048, h=8, hkv=8, d=128, e=128, dtype=torch.float16, tol=1e-2)
    assert not failures, failures


def test_offsets_past_two_to_the_31_elements():
    """A q whose third batch row starts 2³¹ elements in (batch stride 2³⁰, an int32 kernel argument; a lazily
    allocated 4 GiB fp16 buffer of which only the rows used are touched): int32 offset arithmetic wraps below
    the buffer; int64 offsets read the right rows."""
    from longreach.kernels.blocksparse import triton as tri
    from longreach.kernels.masks import place

    s, h, d = 40, 2, 16
    big = torch.empty(2**31 + s * h * d, dtype=torch.float16)  # virtual memory; pages touched on write only
    q = big.as_strided((3, s, h, d), (2**30, h * d, d, 1))
    torch.manual_seed(0)
    q.copy_(torch.randn(3, s, h, d, dtype=torch.float16))
    k = torch.randn(3, s, h, d, dtype=torch.float16)
    v = torch.randn(3, s, h, d, dtype=torch.float16)
    out = torch.zeros(3, s, h, d, dtype=torch.float16)
    lse = torch.empty(3, h, s, dtype=torch.float32)
    plan, bm, bn = tri._prepare(q, k, v, M.causal())
    tri.launch_forward(q, k, v, out, lse, plan, bm, bn, 1 / d**0.5)
    o_ref, l_ref = get_backend("reference").forward(q.double(), k.double(), v.double(), mask=M.causal(), scale=None)
    assert (out.double() - o_ref).abs().max() < 3e-3
    assert (lse.double() - l_ref).abs().max() < 3e-3
    del q, big
