"""Dense backends (reference, cpu), the LSE merge and the core mask algebra, against float64 oracles."""
import math

import pytest
import torch

from longreach.kernels import attention, get_backend, masks, merge_attention
from longreach.kernels.masks import EMPTY, FULL, PARTIAL


def _naive(q, k, v, allowed, scale):
    """Independent float64 statement: softmax over allowed keys, rows with none give 0 / -inf."""
    b, sq, h, d = q.shape
    rep = h // k.shape[2]
    kk = k.repeat_interleave(rep, 2).double()
    vv = v.repeat_interleave(rep, 2).double()
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


MASKS = {
    "none": None,
    "causal": masks.causal(),
    "window5": masks.sliding_window(5),
    "docs": masks.documents([0, 9, 10, 37]),
    "sinks|window": masks.sinks(3) | masks.sliding_window(4),
    "empty": masks.sliding_window(3) & masks.sinks(0),
}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_backend_matches_naive(backend, name, heads):
    torch.manual_seed(0)
    h, hkv = heads
    b, s, d = 2, 37, 12
    q = torch.randn(b, s, h, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, s, hkv, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, s, hkv, d, dtype=torch.float64, requires_grad=True)
    mask = MASKS[name]
    allowed = (torch.ones(1, s, s, dtype=torch.bool) if mask is None
               else mask.dense(torch.arange(s), torch.arange(s), num_heads=h, seq_len=s))[None]
    ref_out, ref_lse = _naive(q, k, v, allowed, 1 / math.sqrt(d))
    out, lse = attention(q, k, v, mask=mask, backend=backend, return_lse=True)
    torch.testing.assert_close(out, ref_out.to(out.dtype), atol=1e-10, rtol=1e-10)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = ~torch.isneginf(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * g).sum(), (q, k, v))
    for a, r in zip(grads, ref_grads):
        assert not a.isnan().any()
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("d,e", [(12, 20), (16, 8)])
def test_cpu_value_head_size_may_differ(d, e):
    torch.manual_seed(4)
    q = torch.randn(1, 21, 4, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 21, 2, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 21, 2, e, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for backend in ("cpu", "reference"):
        out, lse = attention(q, k, v, mask=masks.sliding_window(6), backend=backend, return_lse=True)
        assert out.shape == (1, 21, 4, e)
        outs.append((out, lse))
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("backend", ["reference", "cpu", "slices", "cpu_sparse"])
@pytest.mark.parametrize("name", ["causal", "docs"])
def test_backward_gives_float32_partials_of_bf16_inputs_when_asked(backend, name):
    """``grad_dtype=float32`` on bf16 inputs: float32 gradients that are not bf16 values widened — the
    backend's own gradients of the same values run in float32, 100× closer to the float64 gradients of those
    values than the default bf16 ones — while the default still returns the input dtype."""
    torch.manual_seed(5)
    q, do = (torch.randn(1, 37, 4, 16).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, 37, 2, 16).bfloat16() for _ in range(2))
    be, mask = get_backend(backend), MASKS[name]
    out, lse = be.forward(q, k, v, mask=mask)
    rounded = be.backward(do, q, k, v, out, lse, mask=mask)
    wide = be.backward(do, q, k, v, out, lse, mask=mask, grad_dtype=torch.float32)
    same_in_f32 = be.backward(do.float(), q.float(), k.float(), v.float(), out.float(), lse, mask=mask)
    exact = get_backend("reference").backward(do.double(), q.double(), k.double(), v.double(), out.double(),
                                              lse.double(), mask=mask)
    for g16, g32, g_f32, g64 in zip(rounded, wide, same_in_f32, exact):
        assert g16.dtype == torch.bfloat16 and g32.dtype == torch.float32
        assert torch.equal(g32, g_f32)
        assert not torch.equal(g32, g32.bfloat16().float())
        err16, err32 = ((g.double() - g64).abs().max() for g in (g16, g32))
        assert err32 < 0.01 * err16, (float(err32), float(err16))


def test_cpu_float32_close_to_reference():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 63, 4, 16) for _ in range(3))
    o1, l1 = get_backend("cpu").forward(q, k, v, mask=masks.causal(), scale=None)
    o2, l2 = get_backend("reference").forward(q.double(), k.double(), v.double(), mask=masks.causal(), scale=None)
    torch.testing.assert_close(o1.double(), o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1.double(), l2, atol=1e-5, rtol=1e-5)


def test_unaligned_query_suffix_uses_bottom_right_alignment():
    torch.manual_seed(2)
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    k = torch.randn(1, 9, 2, 8, dtype=torch.float64)
    out, lse = attention(q, k, k, mask=masks.causal(), backend="cpu", return_lse=True)
    # the last query sees every key, the first sees keys 0..4
    allowed = (torch.arange(9)[None, :] <= torch.arange(4, 9)[:, None])[None, None]
    ref, ref_lse = _naive(q, k, k, allowed, 1 / math.sqrt(8))
    torch.testing.assert_close(out, ref)


def test_merge_equals_attention_over_union_and_guards_empty_rows():
    torch.manual_seed(3)
    b, s, h, d = 1, 16, 2, 8
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64) for _ in range(3))
    ref = get_backend("reference")
    mask = masks.causal()
    full_out, full_lse = ref.forward(q, k, v, mask=mask)
    # split keys in two disjoint halves with global positions
    pos = torch.arange(s)
    parts = [slice(0, 7), slice(7, s)]
    out = lse = None
    for sl in parts:
        placed = mask.place(pos, pos[sl], seq_len=s)
        bo, bl = ref.forward(q, k[:, sl], v[:, sl], mask=placed)
        out, lse = merge_attention(out, lse, bo, bl)
    torch.testing.assert_close(out, full_out)
    torch.testing.assert_close(lse, full_lse)
    # both sides empty stays 0 / -inf, never NaN
    e_out = torch.zeros(b, s, h, d)
    e_lse = torch.full((b, h, s), float("-inf"))
    o, l = merge_attention(e_out, e_lse, e_out.clone(), e_lse.clone())
    assert torch.isneginf(l).all() and (o == 0).all()


@pytest.mark.parametrize("name", ["causal", "window5", "docs", "sinks|window"])
def test_block_map_is_exact_or_conservative(name):
    mask = MASKS[name]
    s = 37
    for qp, kp in [(torch.arange(s), torch.arange(s)), (torch.arange(1, s, 3), torch.arange(0, s, 2))]:
        bm = mask.block_map(qp, kp, block_q=4, block_k=8, num_heads=2, seq_len=s)
        d = mask.dense(qp, kp, num_heads=2, seq_len=s)
        for i in range(bm.shape[1]):
            for j in range(bm.shape[2]):
                tile = d[:, i * 4:(i + 1) * 4, j * 8:(j + 1) * 8]
                got = int(bm[0, i, j])
                if got == EMPTY:
                    assert not tile.any()
                elif got == FULL:
                    assert tile.all()
                else:
                    assert got == PARTIAL


def test_mask_errors_name_the_setting():
    with pytest.raises(ValueError, match="sliding_window"):
        masks.sliding_window(0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        masks.documents([1, 5])
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), backend="nope")
