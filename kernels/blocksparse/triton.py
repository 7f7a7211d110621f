"""``triton``: block-sparse flash attention in Triton (forward, backward, LSE, GQA).

The host builds a :class:`~._plan.TilePlan` from the mask: per (head, query tile) the list of non-empty
key tiles, the tile classes, and the elementwise pattern of PARTIAL tiles packed as ``int8 [P, BM, BN]``.
Kernels loop only over listed tiles (EMPTY tiles cost nothing), apply the packed pattern on PARTIAL
tiles and only the sequence bounds on FULL ones. Forward: online softmax, returns out and the natural-log
LSE. Backward (given the *global* out/lse): one kernel accumulates dK/dV per key tile over the query
heads of its K/V head (GQA without expanding K/V), one accumulates dQ per query tile.

Numerics: fp16/bf16 operands stay in their dtype in every ``tl.dot`` (tensor cores) with float32
accumulation; float32 inputs use ``input_precision="ieee"`` (Triton's default on NVIDIA is TF32, which the
interpreter never does). bf16 is cast to float32 on the host only under the interpreter, whose numpy has no
bf16. Every offset — element offsets from strides, tile-plan indices, packed-pattern offsets — is computed in
int64 (past 2³¹ elements in one tensor, e.g. 1M tokens × 16 heads × 128, int32 wraps). Launches set
``num_warps``/``num_stages`` and use 32-token tiles for head dims over 128 (shared memory). Tile plans are
cached per (mask, shape, positions, device), so layers and the backward reuse the device copy. Without
CUDA the module sets ``TRITON_INTERPRET=1`` before importing triton, so the same kernels run (slowly) on
CPU; keep such runs ≤ 256 tokens.
Same contract as :mod:`longreach.kernels.dense.reference`.
"""
from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():  # must precede the triton import: @triton.jit reads it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ..dense.reference import check_shapes  # noqa: E402
from ..masks import Mask, PlacedMask, full, place  # noqa: E402
from ..slices.plan import PlanCache  # noqa: E402
from ._plan import TilePlan, build_plan  # noqa: E402

__all__ = ["forward", "backward", "block_sizes", "launch_forward"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_sizes(device: torch.device, head_dim: int = 64) -> tuple[int, int]:
    """(BM, BN) tile sizes: 64×64 on GPU (32×32 for head dims over 128: q, k, v tiles and the fp32
    accumulator must fit in shared memory); 32×32 under the interpreter (more tiles to skip in tests)."""
    if device.type == "cuda" and not _interpreting():
        return (64, 64) if head_dim <= 128 else (32, 32)
    return (32, 32)


def launch_config(head_dim: int) -> dict[str, int]:
    """``num_warps`` / ``num_stages`` of every launch (no autotuning: one compile per shape)."""
    return {"num_warps": 4 if head_dim <= 64 else 8, "num_stages": 2 if head_dim <= 128 else 1}


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact IEEE float32 for float32 operands (never TF32); fp16/bf16 run natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _heads(bh, H, REP, PER_HEAD: tl.constexpr):
    """Program ``bh`` of the ``B·H`` grid axis → (batch, query head, its K/V head, its plan head)."""
    b = bh // H
    h = bh % H
    hk = h // REP
    if PER_HEAD:
        mh = h
    else:
        mh = 0
    return b, h, hk, mh


@triton.jit
def _load_tile(PTR, b, offs, h, s_b, s_s, s_h, cols, ok, WIDTH):
    """Rows ``offs`` × columns ``cols`` of head ``h`` of a BSHD tensor (zeros outside ``ok`` / ``WIDTH``)."""
    return tl.load(PTR + b * s_b + offs[:, None] * s_s + h * s_h + cols[None, :],
                   mask=ok[:, None] & (cols[None, :] < WIDTH), other=0.0)


@triton.jit
def _store_tile(PTR, val, b, offs, h, s_b, s_s, s_h, cols, ok, WIDTH):
    """Store ``val`` at rows ``offs`` × columns ``cols`` of head ``h`` of a BSHD tensor."""
    tl.store(PTR + b * s_b + offs[:, None] * s_s + h * s_h + cols[None, :], val,
             mask=ok[:, None] & (cols[None, :] < WIDTH))


@triton.jit
def _aranges(BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    """Row, column, head-dim and value-dim offsets of one tile pair."""
    return tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BD), tl.arange(0, BE)


@triton.jit
def _kv_tile(K, V, n, b, hk, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, rn, rd, re, SK, D, E, BN: tl.constexpr):
    """Key tile ``n`` of K/V head ``hk``: positions, which exist, K ``[BN, BD]`` and V ``[BN, BE]``."""
    offs_n = n * BN + rn
    col_ok = offs_n < SK
    k = _load_tile(K, b, offs_n, hk, s_kb, s_ks, s_kh, rd, col_ok, D)
    v = _load_tile(V, b, offs_n, hk, s_vb, s_vs, s_vh, re, col_ok, E)
    return offs_n, col_ok, k, v


@triton.jit
def _tile_pattern(KIND, PIDX, PMASK, at, rm, rn, BM: tl.constexpr, BN: tl.constexpr):
    """The allowed pairs ``[BM, BN]`` of the plan's tile ``at``: all for FULL, its stored mask for PARTIAL."""
    kind = tl.load(KIND + at)
    pidx = tl.maximum(tl.load(PIDX + at), 0).to(tl.int64)
    is_part = (rm[:, None] * 0 + rn[None, :] * 0 + kind.to(tl.int32)) == 1  # [BM, BN] predicate
    pm = tl.load(PMASK + pidx * BM * BN + rm[:, None] * BN + rn[None, :], mask=is_part, other=1)
    return pm != 0


@triton.jit
def _row_stats(LSE, DELTA, base, offs_m, row_ok):
    """lse and delta = rowsum(dO ∘ O) of the rows ``offs_m``; lse −inf read as 0 (p = 0 there anyway)."""
    lse = tl.load(LSE + base + offs_m, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + base + offs_m, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _probs_and_grads(q, k, v, do, lse, delta, allowed, scale, PREC: tl.constexpr):
    """Backward of one tile: probabilities p and score gradients ds = p ∘ (dO·Vᵀ − delta), ``[BM, BN]``."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [BM, BN]
    p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # [BM, BN]
    return p, p * (dp - delta[:, None])


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KIND, PIDX, LIST, CNT, PMASK,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    H, REP, SQ, SK, D, E, NQ, NK, scale,
    PER_HEAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    PREC: tl.constexpr,
):
    qt = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h, hk, mh = _heads(bh, H, REP, PER_HEAD)
    rm, rn, rd, re = _aranges(BM, BN, BD, BE)
    offs_m = qt * BM + rm
    row_ok = offs_m < SQ
    q = _load_tile(Q, b, offs_m, h, s_qb, s_qs, s_qh, rd, row_ok, D)  # [BM, BD]
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BE], dtype=tl.float32)
    row = mh * NQ + qt
    cnt = tl.load(CNT + row)
    for j in range(0, cnt):
        n = tl.load(LIST + row * NK + j).to(tl.int64)
        _, col_ok, k, v = _kv_tile(K, V, n, b, hk, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, rn, rd, re,
                                   SK, D, E, BN)  # k [BN, BD], v [BN, BE]
        allowed = _tile_pattern(KIND, PIDX, PMASK, row * NK + n, rm, rn, BM, BN) & col_ok[None, :]
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [BM, BN] float32
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    _store_tile(O, out.to(O.dtype.element_ty), b, offs_m, h, s_ob, s_os, s_oh, re, row_ok, E)
    tl.store(LSE + bh * SQ + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KIND, PIDX, LIST, CNT, PMASK,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    H, REP, SQ, SK, D, E, NQ, NK, scale,
    PER_HEAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    PREC: tl.constexpr,
):
    qt = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h, hk, mh = _heads(bh, H, REP, PER_HEAD)
    rm, rn, rd, re = _aranges(BM, BN, BD, BE)
    offs_m = qt * BM + rm
    row_ok = offs_m < SQ
    q = _load_tile(Q, b, offs_m, h, s_qb, s_qs, s_qh, rd, row_ok, D)  # [BM, BD]
    do = _load_tile(DO, b, offs_m, h, s_ob, s_os, s_oh, re, row_ok, E)  # [BM, BE]
    lse, delta = _row_stats(LSE, DELTA, bh * SQ, offs_m, row_ok)  # [BM], [BM]
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    row = mh * NQ + qt
    cnt = tl.load(CNT + row)
    for j in range(0, cnt):
        n = tl.load(LIST + row * NK + j).to(tl.int64)
        _, col_ok, k, v = _kv_tile(K, V, n, b, hk, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, rn, rd, re,
                                   SK, D, E, BN)  # k [BN, BD], v [BN, BE]
        allowed = (_tile_pattern(KIND, PIDX, PMASK, row * NK + n, rm, rn, BM, BN)
                   & col_ok[None, :] & row_ok[:, None])
        p, ds = _probs_and_grads(q, k, v, do, lse, delta, allowed, scale, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    _store_tile(DQ, dq * scale, b, offs_m, h, s_qb, s_qs, s_qh, rd, row_ok, D)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KIND, PIDX, TLIST, TCNT, PMASK,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    H, HKV, REP, SQ, SK, D, E, NQ, NK, scale,
    PER_HEAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    PREC: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    rm, rn, rd, re = _aranges(BM, BN, BD, BE)
    offs_n, col_ok, k, v = _kv_tile(K, V, n, b, hk, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, rn, rd, re,
                                    SK, D, E, BN)  # k [BN, BD], v [BN, BE]
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BE], dtype=tl.float32)
    for g in range(0, REP):  # the query heads sharing this K/V head
        h = hk * REP + g
        if PER_HEAD:
            mh = h
        else:
            mh = 0
        col = mh * NK + n
        cnt = tl.load(TCNT + col)
        for j in range(0, cnt):
            qt = tl.load(TLIST + col * NQ + j).to(tl.int64)
            offs_m = qt * BM + rm
            row_ok = offs_m < SQ
            q = _load_tile(Q, b, offs_m, h, s_qb, s_qs, s_qh, rd, row_ok, D)  # [BM, BD]
            do = _load_tile(DO, b, offs_m, h, s_ob, s_os, s_oh, re, row_ok, E)  # [BM, BE]
            lse, delta = _row_stats(LSE, DELTA, (b * H + h) * SQ, offs_m, row_ok)
            allowed = (_tile_pattern(KIND, PIDX, PMASK, (mh * NQ + qt) * NK + n, rm, rn, BM, BN)
                       & col_ok[None, :] & row_ok[:, None])
            p, ds = _probs_and_grads(q, k, v, do, lse, delta, allowed, scale, PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    _store_tile(DK, dk * scale, b, offs_n, hk, s_kb, s_ks, s_kh, rd, col_ok, D)
    _store_tile(DV, dv, b, offs_n, hk, s_vb, s_vs, s_vh, re, col_ok, E)


def _pow2(x: int) -> int:
    return max(16, 1 << (int(x) - 1).bit_length())


_PLANS = PlanCache(32)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | PlacedMask | None):
    """The tile plan on q's device, cached per (mask, shapes, positions, device): built and copied once."""
    check_shapes(q, k, v)
    if q.dtype == torch.float64:
        raise ValueError("the 'triton' attention backend computes in float32; use backend='reference' for float64")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    placed = place(mask, sq, sk, num_heads=h)
    if placed is None:  # full attention: every tile FULL
        placed = full().place(torch.arange(sk - sq, sk), torch.arange(sk), seq_len=sk)
    bm, bn = block_sizes(q.device, d)

    def build() -> TilePlan:
        plan = build_plan(placed, sq, sk, h, bm, bn, with_partial=True)
        for name in ("kind", "row_list", "row_count", "col_list", "col_count", "partial_index", "partial_mask"):
            setattr(plan, name, getattr(plan, name).to(q.device))
        return plan

    return _PLANS.get(placed, (sq, sk, h, bm, bn, str(q.device)), build), bm, bn


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    # numpy (the interpreter) has no bfloat16
    return x.float() if (x.dtype == torch.bfloat16 and _interpreting()) else x


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Mask | PlacedMask | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward. Returns out ``[B, Sq, H, E]`` (q dtype) and lse ``[B, H, Sq]`` float32."""
    plan, bm, bn = _prepare(q, k, v, mask)
    b, sq, h, d = q.shape
    e = v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qc, kc, vc = (_compute_dtype(x).contiguous() for x in (q, k, v))
    out = torch.empty(b, sq, h, e, dtype=qc.dtype, device=q.device)  # [B, Sq, H, E]
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)  # [B, H, Sq]
    if sq == 0:
        return out.to(q.dtype), lse
    launch_forward(qc, kc, vc, out, lse, plan, bm, bn, scale)
    return out.to(q.dtype), lse


def launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   plan: TilePlan, bm: int, bn: int, scale: float) -> None:
    """Launch the forward kernel on tensors as they are (any strides with a unit last one; offsets int64).

    q ``[B, Sq, H, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, E]``, out ``[B, Sq, H, E]`` written in place,
    lse ``[B, H, Sq]`` contiguous float32 written in place.
    """
    b, sq, h, d = q.shape
    sk, hkv, e = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk = plan.kind.shape[1], plan.kind.shape[2]
    _fwd_kernel[(nq, b * h)](
        q, k, v, out, lse, plan.kind, plan.partial_index, plan.row_list, plan.row_count, plan.partial_mask,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        h, h // hkv, sq, sk, d, e, nq, nk, scale,
        PER_HEAD=plan.kind.shape[0] > 1, BM=bm, BN=bn, BD=_pow2(d), BE=_pow2(e), PREC=precision(q.dtype),
        **launch_config(max(d, e)),
    )


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    *, mask: Mask | PlacedMask | None = None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients given the *global* out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]`` of the query rows."""
    plan, bm, bn = _prepare(q, k, v, mask)
    b, sq, h, d = q.shape
    sk, hkv, e = k.shape[1], k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qc, kc, vc = (_compute_dtype(x).contiguous() for x in (q, k, v))
    do = dout.to(qc.dtype).contiguous()  # [B, Sq, H, E]
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Sq]
    lse32 = lse.to(torch.float32).contiguous()
    dq = torch.zeros(b, sq, h, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(b, sk, hkv, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(b, sk, hkv, e, dtype=torch.float32, device=q.device)
    nq, nk = plan.kind.shape[1], plan.kind.shape[2]
    if sq == 0 or sk == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    common = dict(PER_HEAD=plan.kind.shape[0] > 1, BM=bm, BN=bn, BD=_pow2(d), BE=_pow2(e), PREC=precision(qc.dtype),
                  **launch_config(max(d, e)))
    # dq/dk/dv are float32 with the same [B, S, H, *] layouts as q/k/v when contiguous
    _bwd_dq_kernel[(nq, b * h)](
        qc, kc, vc, do, lse32, delta, dq, plan.kind, plan.partial_index, plan.row_list, plan.row_count,
        plan.partial_mask,
        *qc.stride()[:3], *kc.stride()[:3], *vc.stride()[:3], *do.stride()[:3],
        h, h // hkv, sq, sk, d, e, nq, nk, scale, **common,
    )
    _bwd_dkdv_kernel[(nk, b * hkv)](
        qc, kc, vc, do, lse32, delta, dk, dv, plan.kind, plan.partial_index, plan.col_list, plan.col_count,
        plan.partial_mask,
        *qc.stride()[:3], *kc.stride()[:3], *vc.stride()[:3], *do.stride()[:3],
        h, hkv, h // hkv, sq, sk, d, e, nq, nk, scale, **common,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

