"""``cpu_sparse`` (and ``flex`` forward, eagerly on CPU) against the float64 ``reference`` oracle: output,
LSE and all gradients for every mask, odd lengths, GQA, Sq ≠ Sk, global positions, fully masked rows."""
from __future__ import annotations

import warnings

import pytest
import torch

from longreach.kernels import attention, get_backend
from longreach.kernels import masks as M
from longreach.kernels.api import resolve_backend
from longreach.kernels.blocksparse import cpu as sparse_cpu
from longreach.kernels.slices import cpu as slices_cpu
from longreach.kernels.slices import plan as slice_plan

MASKS = {
    "causal": M.causal(),
    "sliding_window": M.sliding_window(19),
    "sinks_window": M.sinks(3) | M.sliding_window(11),
    "documents": M.documents([0, 1, 40, 41, 90, 300]),
    "power": M.power(8),
    "s2_varlen": M.s2(50, "varlen"),
    "s2_roll": M.s2(50, "roll"),
    "sf": M.sf(50, 4),
    "ssa": M.ssa(0.3, window=1, block=16, seed=2).at(step=4, layer=1),
    "empty_rows": M.sliding_window(4) & M.sinks(6),  # queries i >= 9 see no key
    "full": M.full(),
}


def _nan_filled(shape, dtype):
    x = torch.empty(shape, dtype=dtype)
    x.fill_(float("nan"))
    return x.normal_()  # every element overwritten: NaN only survives if something reads garbage


def _inputs(b, sq, sk, h, hkv, d, e, dtype, seed=0):
    torch.manual_seed(seed)
    return (_nan_filled((b, sq, h, d), dtype), _nan_filled((b, sk, hkv, d), dtype), _nan_filled((b, sk, hkv, e), dtype))


def compare(backend: str, mask, *, b=1, sq=200, sk=None, h=4, hkv=2, d=16, e=16, dtype=torch.float64, tol=1e-9):
    """Returns a list of failure strings (empty when the backend matches the reference)."""
    sk = sq if sk is None else sk
    q, k, v = _inputs(b, sq, sk, h, hkv, d, e, dtype)
    ref, be = get_backend("reference"), get_backend(backend)
    o1, l1 = ref.forward(q.double(), k.double(), v.double(), mask=mask, scale=None)
    o2, l2 = be.forward(q, k, v, mask=mask, scale=None)
    torch.manual_seed(1)
    do = torch.randn_like(o1)
    g1 = ref.backward(do, q.double(), k.double(), v.double(), o1, l1, mask=mask, scale=None)
    g2 = be.backward(do.to(dtype), q, k, v, o1.to(dtype), l1.to(l2.dtype), mask=mask, scale=None)
    fails = []
    if o2.dtype != q.dtype or o2.shape != o1.shape or l2.shape != l1.shape:
        fails.append(f"dtype/shape {o2.dtype} {tuple(o2.shape)} {tuple(l2.shape)}")
    if not torch.equal(torch.isneginf(l1), torch.isneginf(l2)):
        fails.append("lse -inf rows differ")
    fin = torch.isfinite(l1)
    checks = [("out", o1, o2), ("lse", l1[fin], l2[fin]), ("dq", g1[0], g2[0]), ("dk", g1[1], g2[1]), ("dv", g1[2], g2[2])]
    for name, a, bb in checks:
        if not torch.isfinite(bb).all():
            fails.append(f"{name} not finite")
            continue
        err = (a - bb.double()).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, a.abs().max().item() if a.numel() else 0.0)
        if err > tol * scale:
            fails.append(f"{name} err {err:.2e}")
    return fails


@pytest.fixture
def small_tiles(monkeypatch):
    # 32-token tiles so that 63/200-token inputs cross many tile boundaries
    monkeypatch.setattr(slice_plan, "TILE", 32)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_cpu_sparse_matches_reference(name, small_tiles):
    mask, failures = MASKS[name], []
    cases = [dict(sq=200, h=4, hkv=2), dict(sq=63, sk=200, h=6, hkv=2, e=12), dict(sq=63, h=3, hkv=1, b=2)]
    if name == "s2_roll":  # the roll path needs N divisible by the group
        cases = [dict(sq=200, h=4, hkv=2), dict(sq=150, h=6, hkv=3, e=12)]
    for case in cases:
        for f in compare("cpu_sparse", mask, **case):
            failures.append(f"{case}: {f}")
    for f in compare("cpu_sparse", mask, sq=200, h=4, hkv=2, dtype=torch.float32, tol=2e-5):
        failures.append(f"float32: {f}")
    assert not failures, failures


def test_cpu_sparse_global_positions_and_head_subset(small_tiles):
    """A PlacedMask with zigzag-like global positions and a Ulysses head subset, as CP passes it."""
    n = 256
    pos = torch.arange(n)
    qp = torch.cat([pos[:64], pos[192:]])  # rank 0 of a 2-rank zigzag
    kp = pos[:200]
    failures = []
    for mask in (M.s2(64, "roll"), M.ssa(0.4, window=1, block=16, seed=0), M.sliding_window(40) | M.sinks(2)):
        placed = mask.place(qp, kp, seq_len=n, heads=torch.tensor([1, 2, 3]), num_heads=4)
        failures += [f"{type(mask).__name__}: {f}" for f in compare("cpu_sparse", placed, sq=128, sk=200, h=3, hkv=1)]
    assert not failures, failures


def test_auto_means_one_thing_locally_and_under_context_parallelism():
    from longreach.kernels import get_backend
    from longreach.parallel.cp.api import _backend

    q = torch.randn(1, 64, 2, 8)
    for mask in (None, M.causal(), M.s2(16), M.sliding_window(9) | M.sinks(2)):
        assert _backend("auto", q, mask) is get_backend(resolve_backend("auto", q, mask)), mask
    assert _backend("auto", q, M.s2(16)) is get_backend("cpu")


def test_autograd_wrapper_and_auto_choice():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 300, 4, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = M.sf(100, 4)
    assert resolve_backend("auto", q, mask) == "cpu"  # which runs the mask as its slice plan
    assert resolve_backend("auto", q, M.causal()) == "cpu"
    assert resolve_backend("auto", q, None) == "cpu"
    out = attention(q, k, v, mask=mask, backend="auto")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    out_r = attention(q, k, v, mask=mask, backend="reference")
    grads_r = torch.autograd.grad(out_r.square().sum(), (q, k, v))
    torch.testing.assert_close(out, out_r, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_cpu_sparse_skips_empty_tiles(monkeypatch):
    """The flash kernel only ever sees the non-empty key tiles of a query tile."""
    calls = []
    real = slices_cpu.CpuRunner.forward

    def spy(self, q, k, v, *, causal, mask, scale, window=None):
        calls.append(q.shape[0] * q.shape[2] * k.shape[2])  # units × rows × keys
        return real(self, q, k, v, causal=causal, mask=mask, scale=scale, window=window)

    monkeypatch.setattr(slices_cpu.CpuRunner, "forward", spy)
    monkeypatch.setattr(slice_plan, "TILE", 32)
    q = torch.randn(1, 512, 2, 8)
    sparse_cpu.forward(q, q, q, mask=M.sliding_window(32), scale=None)
    # each 32-query tile touches its diagonal tile and (except the first) the one before it
    assert sum(calls) == 32 * 32 * (16 + 15)


def test_flex_forward_matches_reference_on_cpu():
    """FlexAttention's eager path (CPU, forward only) with our block mask and mask_mod."""
    failures = []
    flex = get_backend("flex")
    ref = get_backend("reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("causal", "s2_roll", "empty_rows", "ssa"):
            q, k, v = _inputs(1, 200, 200, 4, 2, 16, 16, torch.float32)
            o1, l1 = ref.forward(q.double(), k.double(), v.double(), mask=MASKS[name], scale=None)
            o2, l2 = flex.forward(q, k, v, mask=MASKS[name], scale=None)
            fin = torch.isfinite(l1)
            if not torch.equal(fin, torch.isfinite(l2)):
                failures.append(f"{name}: -inf rows")
            if (o1 - o2).abs().max() > 1e-5 or (l1[fin] - l2[fin]).abs().max() > 1e-5:
                failures.append(f"{name}: out/lse")
    assert not failures, failures


@pytest.mark.gpu
def test_flex_matches_reference_on_gpu():
    failures = []
    flex, ref = get_backend("flex"), get_backend("reference")
    for name in ("causal", "s2_roll", "empty_rows", "ssa", "sf"):
        q, k, v = (x.cuda() for x in _inputs(1, 300, 300, 4, 2, 64, 64, torch.float32))
        o1, l1 = ref.forward(q.double(), k.double(), v.double(), mask=MASKS[name], scale=None)
        o2, l2 = flex.forward(q, k, v, mask=MASKS[name], scale=None)
        do = torch.randn_like(o1)
        g1 = ref.backward(do, q.double(), k.double(), v.double(), o1, l1, mask=MASKS[name], scale=None)
        g2 = flex.backward(do.float(), q, k, v, o1.float(), l1.float(), mask=MASKS[name], scale=None)
        fin = torch.isfinite(l1)
        errs = [(o1 - o2).abs().max(), (l1[fin] - l2[fin]).abs().max()] + [(a - b).abs().max() for a, b in zip(g1, g2)]
        if max(float(x) for x in errs) > 2e-3:
            failures.append(f"{name}: {[float(x) for x in errs]}")
    assert not failures, failures
