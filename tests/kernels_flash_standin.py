"""A stand-in ``flash_attn`` for CPU tests: flash-attn's varlen signatures, computed by the reference.

``install(monkeypatch)`` puts it in ``sys.modules`` for one test; ``CALLS`` records every call (kind,
number of sequences, causal) so tests can check how plans map onto the varlen API. The backward has
the flash-attn ≥ 2.6 signature (``window_size_left``/``_right``, ``softcap``), and writes into the given
``dq``/``dk``/``dv`` as the real one does.
"""
from __future__ import annotations

import sys
import types

import torch

from longreach.kernels import get_backend
from longreach.kernels import masks as M

CALLS: list[tuple[str, int, bool]] = []
WINDOWS: list[tuple[int, int]] = []  # window_size of every windowed forward call


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor):
    for i in range(cu_q.numel() - 1):
        yield slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))


def _allowed(sq: int, sk: int, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """``bool [sq, sk]`` of flash-attn's causal flag and ``window_size`` (both about the bottom-right
    diagonal: row r is aligned with key r + sk − sq; −1 = unbounded)."""
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool)
    left, right = window
    if causal:
        ok &= j <= i
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def _scores(q, k, ok, scale):
    """float64 ``[H, sq, sk]`` scores, −inf where not allowed (K/V heads repeated for GQA)."""
    rep = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    return s.masked_fill(~ok, float("-inf")), rep


def _windowed_forward(q, k, v, scale, ok):
    s, rep = _scores(q, k, ok, scale)
    lse = torch.logsumexp(s, -1)  # [H, sq]; −inf for a row with no key
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khe->qhe", p, v.double().repeat_interleave(rep, 1))
    return out, lse


def _windowed_backward(dout, q, k, v, out, lse, scale, ok):
    """Gradients from the given (global) out and lse: dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))."""
    s, rep = _scores(q, k, ok, scale)
    p = torch.exp(s - lse.double()[..., None]).nan_to_num(0.0)  # [H, sq, sk]
    vv = v.double().repeat_interleave(rep, 1)
    dv = torch.einsum("hqk,qhe->khe", p, dout.double())
    dp = torch.einsum("qhe,khe->hqk", dout.double(), vv)
    ds = p * (dp - (dout.double() * out.double()).sum(-1).T[..., None])
    dq = torch.einsum("hqk,khd->qhd", ds, k.double().repeat_interleave(rep, 1)) * scale
    dk = torch.einsum("hqk,qhd->khd", ds, q.double()) * scale
    fold = (lambda g: g.view(g.shape[0], k.shape[1], rep, g.shape[-1]).sum(2))
    return dq, fold(dk), fold(dv)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    assert dropout_p == 0.0 and softcap == 0.0
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert q.dim() == 3 and k.dim() == 3 and q.shape[1] % k.shape[1] == 0
    CALLS.append(("fwd", cu_seqlens_q.numel() - 1, bool(causal)))
    if tuple(window_size) != (-1, -1):
        WINDOWS.append(tuple(window_size))
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
        for sq, sk in _segments(cu_seqlens_q, cu_seqlens_k):
            ok = _allowed(sq.stop - sq.start, sk.stop - sk.start, causal, tuple(window_size))
            o, l = _windowed_forward(q[sq], k[sk], v[sk], softmax_scale, ok)
            out[sq], lse[:, sq] = o.to(q.dtype), l.float()
        return (out, lse, None) if return_attn_probs else out
    ref = get_backend("reference")
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)  # [H, total_q]
    for sq, sk in _segments(cu_seqlens_q, cu_seqlens_k):
        assert sq.stop - sq.start <= max_seqlen_q and sk.stop - sk.start <= max_seqlen_k
        o, l = ref.forward(q[None, sq], k[None, sk], v[None, sk], mask=M.causal() if causal else None,
                           scale=softmax_scale)  # causal: bottom-right aligned, as flash-attn >= 2.1
        out[sq], lse[:, sq] = o[0], l[0].float()
    return (out, lse, None) if return_attn_probs else out


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, deterministic, rng_state=None, zero_tensors=False):
    assert dropout_p == 0.0
    CALLS.append(("bwd", cu_seqlens_q.numel() - 1, bool(causal)))
    if (window_size_left, window_size_right) != (-1, -1):
        for sq, sk in _segments(cu_seqlens_q, cu_seqlens_k):
            ok = _allowed(sq.stop - sq.start, sk.stop - sk.start, causal, (window_size_left, window_size_right))
            g = _windowed_backward(dout[sq], q[sq], k[sk], v[sk], out[sq], softmax_lse[:, sq], softmax_scale, ok)
            dq[sq], dk[sk], dv[sk] = (x.to(dq.dtype) for x in g)
        return dq, dk, dv, None
    ref = get_backend("reference")
    for sq, sk in _segments(cu_seqlens_q, cu_seqlens_k):
        g = ref.backward(dout[None, sq], q[None, sq], k[None, sk], v[None, sk], out[None, sq],
                         softmax_lse[None, :, sq], mask=M.causal() if causal else None, scale=softmax_scale)
        dq[sq], dk[sk], dv[sk] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv, None


def install(monkeypatch) -> None:
    """Make ``import flash_attn`` (and its ``flash_attn_interface``) return the stand-in for this test."""
    pkg = types.ModuleType("flash_attn")
    pkg.flash_attn_varlen_func = flash_attn_varlen_func
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_varlen_backward = _flash_attn_varlen_backward
    pkg.flash_attn_interface = iface
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", iface)
    CALLS.clear()
    WINDOWS.clear()

