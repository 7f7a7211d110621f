"""Slice plans and their executor (``slices`` on CPU, ``flash`` through a flash-attn stand-in) against the
float64 ``reference``: out, LSE and all gradients; plans compute exactly the allowed pairs, no S×S mask."""
from __future__ import annotations

import pytest
import torch

from longreach.kernels import get_backend
from longreach.kernels import masks as M
from longreach.kernels._regions import Region
from longreach.kernels.dense import flash as flash_backend
from longreach.kernels.slices import plan as slice_plan
import kernels_flash_standin as standin
from test_blocksparse import MASKS, compare



@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: extra threads only add contention on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cases(name: str) -> list[dict]:
    if name == "s2_roll":  # the roll path needs N divisible by the group
        return [dict(sq=200, h=4, hkv=2), dict(sq=150, h=6, hkv=3, e=12)]
    return [dict(sq=200, h=4, hkv=2), dict(sq=63, sk=200, h=6, hkv=2, e=12), dict(sq=63, h=3, hkv=1, b=2)]


@pytest.fixture
def small_chunks(monkeypatch):
    # bands cut into several chunks even at 200 tokens (edge, middle and diagonal pieces)
    monkeypatch.setattr(slice_plan, "CHUNK", 7)
    slice_plan.clear_cache()
    yield
    slice_plan.clear_cache()


@pytest.mark.parametrize("name", sorted(MASKS))
def test_slices_match_reference(name, small_chunks):
    failures = [f"{case}: {f}" for case in _cases(name) for f in compare("slices", MASKS[name], **case)]
    failures += [f"float32: {f}" for f in compare("slices", MASKS[name], sq=200, h=4, hkv=2, dtype=torch.float32,
                                                   tol=2e-5)]
    assert not failures, failures


def test_slices_global_positions_head_subset_and_stripe():
    """PlacedMasks as context parallelism passes them: zigzag runs, a Ulysses head subset, and the stripe
    layout (positions in runs of one token: the tile fallback)."""
    n = 256
    pos = torch.arange(n)
    zigzag = torch.cat([pos[:64], pos[192:]])
    stripe = pos[1::2]
    failures = []
    for mask in (M.s2(64, "roll"), M.ssa(0.4, window=1, block=16, seed=0), M.sliding_window(40) | M.sinks(2),
                 M.documents([0, 30, 100, 256]) & M.causal()):
        for qp, kp in ((zigzag, pos[:200]), (stripe, pos[:200])):
            placed = mask.place(qp, kp, seq_len=n, heads=torch.tensor([1, 2, 3]), num_heads=4)
            failures += [f"{type(mask).__name__} q{qp.numel()}: {f}"
                         for f in compare("slices", placed, sq=qp.numel(), sk=200, h=3, hkv=1)]
    assert not failures, failures


def _allowed_pairs(mask, n: int, heads: int) -> int:
    pos = torch.arange(n)
    d = mask.dense(pos, pos, heads=torch.arange(heads), num_heads=heads, seq_len=n)
    return int(d.sum()) * (heads // d.shape[0])


@pytest.mark.parametrize("name", ["sliding_window", "sinks_window", "documents", "power", "s2_varlen", "s2_roll",
                                  "s2_varlen_8", "sf", "ssa"])
def test_analytic_plans_compute_exactly_the_allowed_pairs(name):
    """Every analytic mask compiles to full and causal units and band units (one mask shared by the whole
    bucket, never a per-unit pattern), covering each allowed pair once."""
    from longreach.bench.kernels import build_mask

    n, h = 1024, 4
    mask = build_mask(name, n, window=200, block=64, seed=0) & M.causal() if name != "s2_roll" else \
        build_mask(name, n, window=200, block=64, seed=0)
    plan = slice_plan.build(mask.place(torch.arange(n), torch.arange(n), seq_len=n, num_heads=h), n, n, h, h)
    assert not plan.fallback
    assert {b.kind for b in plan.buckets} <= {"full", "causal", "mask"}
    assert all(b.mask.shape[0] == 1 for b in plan.buckets if b.mask is not None)
    assert plan.score_elements() == _allowed_pairs(mask, n, h)
    grads = slice_plan.build(mask.place(torch.arange(n), torch.arange(n), seq_len=n, num_heads=h), n, n, h, h,
                             backward=True)
    assert grads.score_elements() == _allowed_pairs(mask, n, h)
    if name in ("s2_varlen", "documents"):
        assert plan.calls() <= 3  # groups / documents of one size run as one batched call


def test_band_units_are_strided_views_with_one_shared_mask():
    """A sliding window compiles to regular band units: query units forward, key units backward (their
    gradients overlap only in dQ), one [1, 1, m, n] mask for the whole bucket."""
    n, h, w = 1024, 2, 200
    placed = M.sliding_window(w).place(torch.arange(n), torch.arange(n), seq_len=n, num_heads=h)
    fwd = slice_plan.build(placed, n, n, h, h)
    bwd = slice_plan.build(placed, n, n, h, h, backward=True)
    for plan, (m, k) in ((fwd, (64, 64 + w - 1)), (bwd, (64 + w - 1, 64))):
        band = max((b for b in plan.buckets if b.mask is not None), key=lambda b: b.rows.shape[0])
        assert band.mask.shape == (1, 1, m, k) and band.regular is not None
        assert band.rows.shape[0] * 64 >= n - w - 64  # the interior is one bucket
    # forward: the first window (causal), the band units and a shorter last unit write disjoint rows: no merge
    assert len(fwd.buckets) == 3 and all(b.first for b in fwd.buckets)


@pytest.mark.parametrize("name", ["sliding_window", "sinks_window", "power", "s2_varlen"])
def test_slices_take_strided_inputs(name):
    """Regular buckets run on strided views of the inputs: inputs laid out [B, H, S, D] (transposed views)
    and a zero-stride-free dout give the reference's out, LSE and gradients."""
    torch.manual_seed(0)
    mask = MASKS[name]
    sq, h, hkv, d = 200, 4, 2, 16
    q = torch.randn(1, h, sq, d, dtype=torch.float64).transpose(1, 2)  # [B, S, H, D], non-contiguous
    k, v = (torch.randn(1, hkv, sq, d, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    ref, be = get_backend("reference"), get_backend("slices")
    o1, l1 = ref.forward(q, k, v, mask=mask, scale=None)
    o2, l2 = be.forward(q, k, v, mask=mask, scale=None)
    do = torch.randn(1, h, sq, d, dtype=torch.float64).transpose(1, 2)
    g1 = ref.backward(do, q, k, v, o1, l1, mask=mask, scale=None)
    g2 = be.backward(do, q, k, v, o1.transpose(1, 2).contiguous().transpose(1, 2), l1, mask=mask, scale=None)
    for a, b in zip((o1, l1, *g1), (o2, l2, *g2)):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9)


def test_tile_fallback_keeps_masks_tile_sized(monkeypatch):
    """A mask without an analytic form runs on tiles: explicit masks never exceed one tile pair."""

    class Checker(M.Mask):  # elementwise only: no regions, no tile classification
        per_head = False

        def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
            q, k = torch.as_tensor(q_pos)[:, None], torch.as_tensor(k_pos)[None, :]
            return ((q + k) % 3 != 0)[None]

    monkeypatch.setattr(slice_plan, "TILE", 32)
    n = 150
    placed = Checker().place(torch.arange(n), torch.arange(n), seq_len=n)
    plan = slice_plan.build(placed, n, n, 2, 2)
    assert plan.fallback
    assert all(b.mask.shape[-2:] == (32, 32) or b.mask.shape[-1] <= 32 for b in plan.buckets if b.mask is not None)
    assert not compare("slices", placed, sq=n, h=2, hkv=1)


def test_plan_cache_keys_on_the_pattern_not_the_object():
    slice_plan.clear_cache()
    n = 512
    pos = torch.arange(n)
    built = []
    real = slice_plan.build
    try:
        slice_plan.build = lambda *a, **kw: built.append(1) or real(*a, **kw)
        for _ in range(3):  # a new mask object per call, as each layer builds it
            mask = M.causal() & M.documents([0, 100, 300, 512]) & M.s2(128)
            slice_plan.get_plan(mask.place(pos, pos, seq_len=n, num_heads=4), n, n, 4, 2)
        slice_plan.get_plan((M.causal() & M.s2(64)).place(pos, pos, seq_len=n, num_heads=4), n, n, 4, 2)
        slice_plan.get_plan((M.causal() & M.s2(64)).place(pos + 0, pos.flip(0), seq_len=n, num_heads=4), n, n, 4, 2)
    finally:
        slice_plan.build = real
    assert len(built) == 3


def test_region_algebra_is_exact_and_disjoint():
    """Union through set differences: every pair of sinks | window | documents painted exactly once."""
    n = 97
    mask = (M.sinks(5) | M.sliding_window(9)) | (M.documents([0, 40, 97]) & M.power(4))
    regions = mask.regions(0, 1, n)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    count = torch.zeros(n, n, dtype=torch.int64)
    for r in regions:
        assert isinstance(r, Region)
        count += ((q >= r.q0) & (q < r.q1) & (k >= r.k0) & (k < r.k1) & (q - k >= r.dlo) & (q - k <= r.dhi)).long()
    assert torch.equal(count, mask.dense(torch.arange(n), torch.arange(n), seq_len=n)[0].long())


@pytest.fixture
def flash_standin(monkeypatch):
    standin.install(monkeypatch)
    monkeypatch.setattr(flash_backend, "FLASH_DTYPES", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    slice_plan.clear_cache()
    yield standin.CALLS
    slice_plan.clear_cache()


@pytest.mark.parametrize("name", ["causal", "s2_varlen", "s2_roll", "sf", "documents", "sliding_window", "ssa",
                                  "empty_rows", "full"])
def test_flash_varlen_path_matches_reference(name, flash_standin):
    """Every mask's plan through flash-attn's varlen signature: out, LSE and gradients equal the reference."""
    # flash-attn's LSE is float32 whatever the inputs: compare in float32
    failures = [f"{case}: {f}" for case in _cases(name)[:2]
                for f in compare("flash", MASKS[name], dtype=torch.float32, tol=2e-5, **case)]
    assert not failures, failures
    kinds = {(c[0], c[2]) for c in flash_standin}
    assert ("fwd", True) in kinds or name in ("full",)  # causal units went through varlen causal=True
    assert any(c[0] == "bwd" for c in flash_standin)


def test_flash_runs_one_varlen_call_per_bucket(flash_standin):
    """S2 at 512 tokens: equal groups are ONE varlen call with one sequence per (group, batch row)."""
    torch.manual_seed(0)
    q = torch.randn(2, 512, 4, 16)
    mask = M.causal() & M.s2(128)
    out, lse = get_backend("flash").forward(q, q, q, mask=mask, scale=None)
    ref_out, ref_lse = get_backend("reference").forward(q.double(), q.double(), q.double(), mask=mask, scale=None)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    fwd = [c for c in flash_standin if c[0] == "fwd"]
    # unshifted heads: 4 groups of 128; shifted: 3 of 128 (same bucket) plus 2 half groups of 64
    assert fwd == [("fwd", (4 + 3) * 2, True), ("fwd", 2 * 2, True)]


def test_flash_runs_band_units_with_its_own_window(flash_standin):
    """A sliding window's band units (query units forward, key units backward) reach flash-attn as
    ``window_size`` instead of a mask: out, LSE and every gradient equal the reference."""
    failures = compare("flash", M.sliding_window(100), sq=512, h=4, hkv=2, dtype=torch.float32, tol=2e-5)
    assert not failures, failures
    windows = set(standin.WINDOWS)
    assert windows, "no band unit reached flash-attn's window_size"
    assert all(min(w) == 0 and max(w) > 0 for w in windows), windows  # (left, 0) or (0, right)
    assert any(w[0] > 0 for w in windows)  # query units: keys r … r + n − m


def test_auto_routes_cuda_to_flash_and_cpu_to_slices():
    from longreach.kernels.api import resolve_backend

    q = torch.empty(1, 8, 2, 4)
    assert [resolve_backend("auto", q, m) for m in (None, M.causal(), M.s2(4))] == ["cpu", "cpu", "cpu"]

    class FakeCuda:
        device, dtype = torch.device("cuda"), torch.bfloat16
    for mask in (None, M.causal(), M.s2(4)):
        assert resolve_backend("auto", FakeCuda(), mask) == "flash"


def test_bench_kernels_cpu_clock(tmp_path, capsys):
    """``bench kernels --clock cpu`` times with the process CPU clock and records it with the results."""
    import json

    from longreach.bench import kernels as bench_kernels

    out = tmp_path / "k.json"
    assert bench_kernels.main(["--seq-len", "256", "--heads", "2", "--head-dim", "16", "--masks", "sliding_window",
                               "--window", "64", "--rounds", "2", "--clock", "cpu", "--json", str(out)]) == 0
    assert "cpu clock" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"]["clock"] == "cpu"
    row = next(r for r in result["masks"] if r["mask"] == "sliding_window")
    for col in ("fwd:slices", "fwdbwd:slices"):
        assert row[col]["rounds"] == 2 and row[col]["min"] <= row[col]["median"] <= row[col]["max"]


def test_bench_kernels_layout_suite(tmp_path, capsys):
    """``bench kernels --suite layout`` times the CPU kernel on token-major and heads-first q/k/v of the three
    zigzag block shapes, and the two layouts give the same results (what the context-parallel layers rely on)."""
    import json

    from longreach.bench import kernels as bench_kernels
    from longreach.kernels.api import get_backend
    from longreach.kernels.dense import heads_major

    out = tmp_path / "l.json"
    assert bench_kernels.main(["--suite", "layout", "--seq-len", "64", "--heads", "2", "--head-dim", "16",
                               "--rounds", "2", "--json", str(out)]) == 0
    assert "heads-first ÷ token-major" in capsys.readouterr().out
    rows = json.loads(out.read_text())["layout"]
    assert [r["block"] for r in rows] == ["causal 64x64", "full 32x64", "full 64x32"]
    for r in rows:
        assert r["fwdbwd"]["rounds"] == 2 and 0 < r["fwdbwd"]["min"] <= r["fwdbwd"]["median"] <= r["fwdbwd"]["max"]
    # same values either way, forward and backward; heads-first q gives a heads-first out
    be, g = get_backend("cpu"), torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 48, 4, 16, generator=g).bfloat16() for _ in range(4))
    o1, l1 = be.forward(q, k, v, mask=M.causal())
    qh, kh, vh = (heads_major(t) for t in (q, k, v))
    o2, l2 = be.forward(qh, kh, vh, mask=M.causal())
    assert o2.transpose(1, 2).is_contiguous() and o1.is_contiguous()
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for a, b in zip(be.backward(do, q, k, v, o1, l1, mask=M.causal()), be.backward(do, qh, kh, vh, o2, l2, mask=M.causal())):
        assert torch.equal(a, b)
