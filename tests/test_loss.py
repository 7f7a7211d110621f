"""Chunked cross-entropy against full cross-entropy (value and gradients) and its memory bound."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longreach.loss import chunked_cross_entropy, global_token_count


def _data(b, s, d, v, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, s, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype) / d**0.5
    y = torch.randint(0, v, (b, s), generator=g)
    y[0, :3] = -100
    y[-1, -1] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_matches_full_cross_entropy(chunk):
    h, w, y = _data(2, 23, 12, 31)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss, n = chunked_cross_entropy(h, w, y, chunk_size=chunk)
    gh, gw = torch.autograd.grad(loss * 0.7, (h, w))
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = F.cross_entropy((h2 @ w2.T).reshape(-1, 31), y.reshape(-1), reduction="sum", ignore_index=-100)
    rh, rw = torch.autograd.grad(ref * 0.7, (h2, w2))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert int(n) == int((y != -100).sum())
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)


def test_bf16_hidden_accumulates_in_float32():
    h, w, y = _data(1, 40, 16, 50, dtype=torch.float32, seed=1)
    hb, wb = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    loss, _ = chunked_cross_entropy(hb, wb, y, chunk_size=9)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = F.cross_entropy((hb.float() @ wb.float().T).reshape(-1, 50), y.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not push the logits into bf16
        loss2, _ = chunked_cross_entropy(h, w, y, chunk_size=9)
    ref32 = F.cross_entropy((h @ w.T).reshape(-1, 50), y.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss2, ref32, rtol=1e-6, atol=1e-5)


def test_memory_does_not_scale_with_sequence_times_vocab():
    """What autograd keeps is O(S·D + V·D + S), never a [S, V] logits tensor, whatever S is."""
    d, v = 8, 512
    for s in (256, 1024):
        h, w, y = _data(1, s, d, v, dtype=torch.float32)
        h.requires_grad_(True)
        w.requires_grad_(True)
        saved: list[int] = []

        def pack(t):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = chunked_cross_entropy(h, w, y, chunk_size=64)
        assert max(saved) < s * v // 4, f"a saved tensor of {max(saved)} elements at S={s}, V={v}"
        assert sum(saved) <= s * d + v * d + 2 * s, f"saved {sum(saved)} elements at S={s}"
        # the full-logits path would keep S·V elements
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(h[0] @ w.T, y[0], reduction="sum")
        assert max(saved) >= s * v
        loss.backward()
        assert h.grad.shape == h.shape and torch.isfinite(w.grad).all()


def test_bad_input_and_token_count():
    h, w, y = _data(1, 5, 4, 7)
    with pytest.raises(ValueError, match="loss_chunk_size"):
        chunked_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(h, w, y[:, :3], chunk_size=2)
    assert int(global_token_count(torch.tensor(5))) == 5  # no process group: unchanged
    assert int(global_token_count(3)) == 3
