"""Triton lightning attention (Lightning Attention-2): forward and explicit backward kernels.

One program per (batch, head) walks the sequence in blocks of ``BLOCK`` tokens with the ``[D, E]``
state in float32 registers:

* forward: intra ``[(Q_t K_tᵀ) ⊙ D] V_t`` + inter ``diag(λ^{i+1}) Q_t KV``, then
  ``KV ← λ^{n} KV + (diag(λ^{n−1−j}) K_t)ᵀ V_t`` (n = the block's real length);
* backward dQ: a forward scan recomputing KV;
* backward dK, dV, dS0: a reverse scan of G (the gradient of the state leaving each block).

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (float32 there; keep it to a few hundred tokens).
Inputs are computed in float32 whatever their dtype; float64 is not supported (use ``chunk``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._autograd import explicit_function

__all__ = ["lightning", "forward", "backward"]

DEFAULT_BLOCK = 64


@triton.jit
def _load_rows(ptr, b, h, start, seq_len, stride_b, stride_s, stride_h, width,
               BLOCK: tl.constexpr, BW: tl.constexpr):
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BW)
    offs = b * stride_b + rows[:, None] * stride_s + h * stride_h + cols[None, :]
    m = (rows[:, None] < seq_len) & (cols[None, :] < width)
    return tl.load(ptr + offs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, val, b, h, start, seq_len, stride_b, stride_s, stride_h, width,
                BLOCK: tl.constexpr, BW: tl.constexpr):
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BW)
    offs = b * stride_b + rows[:, None] * stride_s + h * stride_h + cols[None, :]
    m = (rows[:, None] < seq_len) & (cols[None, :] < width)
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _state_offsets(pid, D, E, BD: tl.constexpr, BE: tl.constexpr):
    d = tl.arange(0, BD)
    e = tl.arange(0, BE)
    offs = pid * D * E + d[:, None] * E + e[None, :]
    m = (d[:, None] < D) & (e[None, :] < E)
    return offs, m


@triton.jit
def _fwd_kernel(Q, K, V, S0, O, SF, DECAY, seq_len, H, D, E,
                sq_b, sq_s, sq_h, sv_b, sv_s, sv_h,
                HAS_S0: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    s = tl.load(DECAY + h).to(tl.float32)
    c = tl.arange(0, BLOCK)
    diff = (c[:, None] - c[None, :]).to(tl.float32)
    dmat = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)  # [BLOCK, BLOCK]
    q_w = tl.exp(-s * (c + 1).to(tl.float32))  # [BLOCK]
    soffs, smask = _state_offsets(pid, D, E, BD, BE)
    if HAS_S0:
        kv = tl.load(S0 + soffs, mask=smask, other=0.0).to(tl.float32)
    else:
        kv = tl.zeros((BD, BE), dtype=tl.float32)
    for start in range(0, seq_len, BLOCK):
        n = tl.minimum(seq_len - start, BLOCK)
        q = _load_rows(Q, b, h, start, seq_len, sq_b, sq_s, sq_h, D, BLOCK, BD)  # [BLOCK, BD]
        k = _load_rows(K, b, h, start, seq_len, sq_b, sq_s, sq_h, D, BLOCK, BD)
        v = _load_rows(V, b, h, start, seq_len, sv_b, sv_s, sv_h, E, BLOCK, BE)  # [BLOCK, BE]
        scores = tl.dot(q, tl.trans(k)) * dmat  # [BLOCK, BLOCK]
        o = tl.dot(scores, v) + tl.dot(q * q_w[:, None], kv)  # [BLOCK, BE]
        _store_rows(O, o, b, h, start, seq_len, sv_b, sv_s, sv_h, E, BLOCK, BE)
        gap = (n - 1 - c).to(tl.float32)
        k_w = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
        kv = tl.exp(-s * n.to(tl.float32)) * kv + tl.dot(tl.trans(k * k_w[:, None]), v)
    tl.store(SF + soffs, kv, mask=smask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, S0, DO, DQ, DECAY, seq_len, H, D, E,
                   sq_b, sq_s, sq_h, sv_b, sv_s, sv_h,
                   HAS_S0: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    s = tl.load(DECAY + h).to(tl.float32)
    c = tl.arange(0, BLOCK)
    diff = (c[:, None] - c[None, :]).to(tl.float32)
    dmat = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
    q_w = tl.exp(-s * (c + 1).to(tl.float32))
    soffs, smask = _state_offsets(pid, D, E, BD, BE)
    if HAS_S0:
        kv = tl.load(S0 + soffs, mask=smask, other=0.0).to(tl.float32)
    else:
        kv = tl.zeros((BD, BE), dtype=tl.float32)
    for start in range(0, seq_len, BLOCK):
        n = tl.minimum(seq_len - start, BLOCK)
        k = _load_rows(K, b, h, start, seq_len, sq_b, sq_s, sq_h, D, BLOCK, BD)
        v = _load_rows(V, b, h, start, seq_len, sv_b, sv_s, sv_h, E, BLOCK, BE)
        do = _load_rows(DO, b, h, start, seq_len, sv_b, sv_s, sv_h, E, BLOCK, BE)
        ds = tl.dot(do, tl.trans(v)) * dmat  # [BLOCK, BLOCK]
        dq = tl.dot(ds, k) + tl.dot(do * q_w[:, None], tl.trans(kv))  # [BLOCK, BD]
        _store_rows(DQ, dq, b, h, start, seq_len, sq_b, sq_s, sq_h, D, BLOCK, BD)
        gap = (n - 1 - c).to(tl.float32)
        k_w = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
        kv = tl.exp(-s * n.to(tl.float32)) * kv + tl.dot(tl.trans(k * k_w[:, None]), v)


@triton.jit
def _bwd_dkv_kernel(Q, K, V, DSF, DO, DK, DV, DS0, DECAY, seq_len, H, D, E,
                    sq_b, sq_s, sq_h, sv_b, sv_s, sv_h,
                    HAS_DSF: tl.constexpr, HAS_S0: tl.constexpr,
                    BLOCK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    s = tl.load(DECAY + h).to(tl.float32)
    c = tl.arange(0, BLOCK)
    diff = (c[:, None] - c[None, :]).to(tl.float32)
    dmat = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
    q_w = tl.exp(-s * (c + 1).to(tl.float32))
    soffs, smask = _state_offsets(pid, D, E, BD, BE)
    if HAS_DSF:
        g = tl.load(DSF + soffs, mask=smask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BD, BE), dtype=tl.float32)
    nblocks = tl.cdiv(seq_len, BLOCK)
    for i in range(0, nblocks):
        start = (nblocks - 1 - i) * BLOCK
        n = tl.minimum(seq_len - start, BLOCK)
        q = _load_rows(Q, b, h, start, seq_len, sq_b, sq_s, sq_h, D, BLOCK, BD)
        k = _load_rows(K, b, h, start, seq_len, sq_b, sq_s, sq_h, D, BLOCK, BD)
        v = _load_rows(V, b, h, start, seq_len, sv_b, sv_s, sv_h, E, BLOCK, BE)
        do = _load_rows(DO, b, h, start, seq_len, sv_b, sv_s, sv_h, E, BLOCK, BE)
        ds = tl.dot(do, tl.trans(v)) * dmat  # [BLOCK(i), BLOCK(j)]
        sc = tl.dot(q, tl.trans(k)) * dmat
        gap = (n - 1 - c).to(tl.float32)
        k_w = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
        dk = tl.dot(tl.trans(ds), q) + tl.dot(v * k_w[:, None], tl.trans(g))  # [BLOCK, BD]
        dv = tl.dot(tl.trans(sc), do) + tl.dot(k * k_w[:, None], g)  # [BLOCK, BE]
        _store_rows(DK, dk, b, h, start, seq_len, sq_b, sq_s, sq_h, D, BLOCK, BD)
        _store_rows(DV, dv, b, h, start, seq_len, sv_b, sv_s, sv_h, E, BLOCK, BE)
        g = tl.exp(-s * n.to(tl.float32)) * g + tl.dot(tl.trans(q * q_w[:, None]), do)
    if HAS_S0:
        tl.store(DS0 + soffs, g, mask=smask)


def _dims(q: torch.Tensor, v: torch.Tensor, block: int) -> tuple[int, int, int]:
    d, e = q.shape[-1], v.shape[-1]
    return max(16, triton.next_power_of_2(block)), max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(e))


def _check_device(q: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise ValueError("lightning backend 'triton' computes in float32; use backend='chunk' or 'naive' for float64")
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("lightning backend 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1 on CPU")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
            initial_state: torch.Tensor | None = None, chunk_size: int = DEFAULT_BLOCK
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward → ``(out [B, S, H, E]`` in q's dtype, ``state [B, H, D, E]`` float32)."""
    _check_device(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, s, h, d = q.shape
    e = v.shape[-1]
    block, bd, be = _dims(q, v, chunk_size)
    rate = decay.to(device=q.device, dtype=torch.float32).contiguous()
    out = torch.empty(b, s, h, e, dtype=q.dtype, device=q.device)
    final = torch.empty(b, h, d, e, dtype=torch.float32, device=q.device)
    s0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else final
    _fwd_kernel[(b * h,)](q, k, v, s0, out, final, rate, s, h, d, e,
                          q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
                          HAS_S0=initial_state is not None, BLOCK=block, BD=bd, BE=be)
    return out, final


def backward(dout: torch.Tensor, dstate: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, decay: torch.Tensor, initial_state: torch.Tensor | None = None,
             chunk_size: int = DEFAULT_BLOCK
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Kernel backward → ``(dq, dk, dv, d_initial_state)`` (the last None without an initial state)."""
    _check_device(q)
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous().to(v.dtype)
    b, s, h, d = q.shape
    e = v.shape[-1]
    block, bd, be = _dims(q, v, chunk_size)
    rate = decay.to(device=q.device, dtype=torch.float32).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    s0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None
    dsf = dstate.to(torch.float32).contiguous() if dstate is not None else None
    ds0 = torch.empty(b, h, d, e, dtype=torch.float32, device=q.device) if s0 is not None else None
    strides = (q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2))
    _bwd_dq_kernel[(b * h,)](q, k, v, s0 if s0 is not None else dq, dout, dq, rate, s, h, d, e, *strides,
                             HAS_S0=s0 is not None, BLOCK=block, BD=bd, BE=be)
    _bwd_dkv_kernel[(b * h,)](q, k, v, dsf if dsf is not None else dq, dout, dk, dv,
                              ds0 if ds0 is not None else dq, rate, s, h, d, e, *strides,
                              HAS_DSF=dsf is not None, HAS_S0=s0 is not None, BLOCK=block, BD=bd, BE=be)
    if ds0 is not None and initial_state is not None:
        ds0 = ds0.to(initial_state.dtype)
    return dq, dk, dv, ds0


_TritonLightning = explicit_function(forward, backward, "_TritonLightning")


def lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
              initial_state: torch.Tensor | None = None, chunk_size: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd-aware Triton lightning attention → ``(out [B, S, H, E], state [B, H, D, E])``."""
    return _TritonLightning.apply(q, k, v, decay, initial_state, chunk_size or DEFAULT_BLOCK)
