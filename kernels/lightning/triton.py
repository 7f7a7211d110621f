"""Triton lightning attention (Lightning Attention-2), forward and explicit backward, split over blocks.

The sequence is cut into blocks of ``BLOCK`` tokens; per head λ = e^{−s}. Every pass is one of three
kernels, each with a program per (block, batch·head[, output tile]) — the grid grows with the sequence,
not one program per (batch, head):

* ``_block_state_kernel``: a block's own state, ``M_t = (K_t ⊙ k_w)ᵀ V_t`` (forward) or
  ``A_t = (Q_t ⊙ q_w)ᵀ dO_t`` (backward), ``[D, E]`` in float32;
* ``_scan_kernel``: the only sequential part, over blocks of ``[D, E]`` states, elementwise (split
  over the state's elements): entering states ``KV_{t+1} = λ^{n_t} KV_t + M_t`` (from the initial
  state), or in reverse the gradients of the leaving states ``G_{t−1} = A_t + λ^{n_t} G_t`` (from
  d(final state); its end is d(initial state));
* ``_rows_kernel``: a block's rows, ``P Y_t + (X_t ⊙ w) Z_t`` with ``P = (A_t B_tᵀ) ⊙ D`` or ``Pᵀ``:
  forward ``out = (Q Kᵀ ⊙ D) V + (Q ⊙ q_w) KV``; backward ``dQ = (dO Vᵀ ⊙ D) K + (dO ⊙ q_w) KVᵀ``,
  ``dK = (dO Vᵀ ⊙ D)ᵀ Q + (V ⊙ k_w) Gᵀ``, ``dV = (Q Kᵀ ⊙ D)ᵀ dO + (K ⊙ k_w) G``.

Numerics for a real GPU: element offsets are int64 (``_row_offsets``, ``_state_offsets``: a
``[B, S, H, D]`` tensor passes 2³¹ elements at 1M tokens × 16 heads × 128); fp32 dots ask for
``input_precision="ieee"`` (Triton's default on NVIDIA is TF32, which the interpreter never shows);
bf16/fp16 operands stay in their dtype (the score and the state are cast to it, as flash kernels do)
with float32 accumulation; decay and document factors are float32. ``num_warps``/``num_stages`` are
chosen from the tile sizes (:func:`_launch_options`; one stage for 256-wide tiles, which would not fit
two stages in shared memory). Packed documents (``doc_ids``) multiply the decay factors by the 0/1
factors of :mod:`.documents`. The states ``[B, H, S/BLOCK, D, E]`` (float32) are recomputed in
backward, not stored.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (keep it to a few hundred tokens there); float64
is not supported (use ``chunk``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._autograd import explicit_function

__all__ = ["lightning", "forward", "backward"]

DEFAULT_BLOCK = 64
MAX_TILE = 64  # output columns per program (D or E tile)
SCAN_TILE = 1024  # state elements per scan program


@triton.jit
def _row_offsets(b, h, rows, cols, stride_b, stride_s, stride_h):
    """int64 offsets ``[R, W]`` of ``rows × cols`` of (batch ``b``, head ``h``) in a ``[B, S, H, X]``
    tensor with unit stride along X (every product is taken in int64: none can wrap at 2³¹)."""
    return (b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
            + rows.to(tl.int64)[:, None] * stride_s + cols.to(tl.int64)[None, :])


@triton.jit
def _state_offsets(bh, t, n_blocks, rows, cols, stride_row, stride_col, state_size):
    """int64 offsets ``[R, W]`` into the block states ``[B·H, NB, D, E]`` of (batch·head ``bh``, block ``t``)."""
    base = (bh.to(tl.int64) * n_blocks + t) * state_size
    return base + rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def _mm(a, b):
    """``a @ b`` with float32 accumulation; fp32 operands in full (IEEE) precision, never TF32."""
    return tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def _block_program(DECAY, H, BLOCK: tl.constexpr):
    """This program's (block t, batch·head bh, output tile, batch b, head h, decay rate, first row) on a
    ``(blocks, B·H, tiles)`` grid."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    return t, bh, tl.program_id(2), bh // H, h, tl.load(DECAY + h), t.to(tl.int64) * BLOCK


@triton.jit
def _block_factors(DOC, doc_row, start, seq_len, rate, HAS_DOCS: tl.constexpr, BLOCK: tl.constexpr):
    """Float32 decay factors of the block ``[start, start + n)``, times its document factors.

    Returns ``dmat [BLOCK, BLOCK]`` (λ^{i−j}, j ≤ i, same document), ``q_w [BLOCK]`` (λ^{i+1}, query in
    the entering state's document) and ``k_w [BLOCK]`` (λ^{n−1−j}, key real and in the last document).
    """
    c = tl.arange(0, BLOCK)
    n = tl.minimum(seq_len - start, BLOCK)
    diff = (c[:, None] - c[None, :]).to(tl.float32)
    dmat = tl.where(diff >= 0, tl.exp(-rate * tl.maximum(diff, 0.0)), 0.0)
    q_w = tl.exp(-rate * (c + 1).to(tl.float32))
    gap = (n - 1 - c).to(tl.float32)
    k_w = tl.where(gap >= 0, tl.exp(-rate * tl.maximum(gap, 0.0)), 0.0)
    if HAS_DOCS:
        rows = start + c
        doc = tl.load(DOC + doc_row + rows, mask=rows < seq_len, other=-1)
        prev = tl.load(DOC + doc_row + tl.maximum(start - 1, 0))  # token before the block (token 0 first)
        last = tl.load(DOC + doc_row + start + n - 1)
        dmat = tl.where(doc[:, None] == doc[None, :], dmat, 0.0)
        q_w = tl.where(doc == prev, q_w, 0.0)
        k_w = tl.where(doc == last, k_w, 0.0)
    return dmat, q_w, k_w


@triton.jit
def _block_state_kernel(A, B, OUT, DOC, DECAY, seq_len, H, n_blocks, FA, FB,
                        sa_b, sa_s, sa_h, sb_b, sb_s, sb_h, sdoc_b,
                        KEY_WEIGHTS: tl.constexpr, HAS_DOCS: tl.constexpr,
                        BLOCK: tl.constexpr, BFA: tl.constexpr, BFB: tl.constexpr):
    """``OUT[bh, t, :, tile] = (A_t ⊙ w)ᵀ B_t[:, tile]``, w = k_w (KEY_WEIGHTS) or q_w."""
    t, bh, tile, b, h, rate, start = _block_program(DECAY, H, BLOCK)
    _, q_w, k_w = _block_factors(DOC, b.to(tl.int64) * sdoc_b, start, seq_len, rate, HAS_DOCS, BLOCK)
    if KEY_WEIGHTS:
        w = k_w
    else:
        w = q_w
    rows = start + tl.arange(0, BLOCK)
    fa = tl.arange(0, BFA)
    fb = tile * BFB + tl.arange(0, BFB)
    a = tl.load(A + _row_offsets(b, h, rows, fa, sa_b, sa_s, sa_h),
                mask=(rows[:, None] < seq_len) & (fa[None, :] < FA), other=0.0)  # [BLOCK, BFA]
    bm = tl.load(B + _row_offsets(b, h, rows, fb, sb_b, sb_s, sb_h),
                 mask=(rows[:, None] < seq_len) & (fb[None, :] < FB), other=0.0)  # [BLOCK, BFB]
    aw = (a.to(tl.float32) * w[:, None]).to(a.dtype)
    x = _mm(tl.trans(aw), bm)  # [BFA, BFB]
    tl.store(OUT + _state_offsets(bh, t, n_blocks, fa, fb, FB, 1, FA * FB), x,
             mask=(fa[:, None] < FA) & (fb[None, :] < FB))


@triton.jit
def _scan_kernel(X, DEC, INIT, STATES, FINAL, n_blocks, state_size,
                 REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, BF: tl.constexpr):
    """Per batch·head, over blocks (last to first when REVERSE): ``STATES[t] = acc``;
    ``acc = DEC[t] · acc + X[t]``; then ``FINAL = acc``. Elementwise over a tile of the ``[D, E]`` state."""
    bh = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64) * BF + tl.arange(0, BF)
    m = f < state_size
    if HAS_INIT:
        acc = tl.load(INIT + bh * state_size + f, mask=m, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BF,), dtype=tl.float32)
    for i in range(0, n_blocks):
        if REVERSE:
            t = n_blocks - 1 - i
        else:
            t = i
        offs = (bh * n_blocks + t) * state_size + f
        tl.store(STATES + offs, acc, mask=m)
        acc = tl.load(DEC + bh * n_blocks + t) * acc + tl.load(X + offs, mask=m, other=0.0)
    tl.store(FINAL + bh * state_size + f, acc, mask=m)


@triton.jit
def _rows_kernel(A, B, Y, X, Z, OUT, DOC, DECAY, seq_len, H, n_blocks, FP, FX, W,
                 sa_b, sa_s, sa_h, sb_b, sb_s, sb_h, sy_b, sy_s, sy_h, sx_b, sx_s, sx_h, so_b, so_s, so_h,
                 sdoc_b, sz_f, sz_w, state_size,
                 TRANS: tl.constexpr, HAS_DOCS: tl.constexpr,
                 BLOCK: tl.constexpr, BFP: tl.constexpr, BFX: tl.constexpr, BW: tl.constexpr):
    """``OUT_t[:, tile] = P Y_t[:, tile] + (X_t ⊙ w) Z_t[:, tile]`` with ``P = (A_t B_tᵀ) ⊙ dmat``
    (transposed and w = k_w when TRANS, else w = q_w); Z is block t's ``[D, E]`` state read with
    strides ``(sz_f, sz_w)`` (so it can be read transposed)."""
    t, bh, tile, b, h, rate, start = _block_program(DECAY, H, BLOCK)
    dmat, q_w, k_w = _block_factors(DOC, b.to(tl.int64) * sdoc_b, start, seq_len, rate, HAS_DOCS, BLOCK)
    rows = start + tl.arange(0, BLOCK)
    live = rows[:, None] < seq_len
    fp = tl.arange(0, BFP)
    a = tl.load(A + _row_offsets(b, h, rows, fp, sa_b, sa_s, sa_h), mask=live & (fp[None, :] < FP), other=0.0)
    bm = tl.load(B + _row_offsets(b, h, rows, fp, sb_b, sb_s, sb_h), mask=live & (fp[None, :] < FP), other=0.0)
    p = _mm(a, tl.trans(bm)) * dmat  # [BLOCK, BLOCK] float32
    if TRANS:
        p = tl.trans(p)
        w = k_w
    else:
        w = q_w
    fw = tile * BW + tl.arange(0, BW)
    fx = tl.arange(0, BFX)
    y = tl.load(Y + _row_offsets(b, h, rows, fw, sy_b, sy_s, sy_h), mask=live & (fw[None, :] < W), other=0.0)
    x = tl.load(X + _row_offsets(b, h, rows, fx, sx_b, sx_s, sx_h), mask=live & (fx[None, :] < FX), other=0.0)
    z = tl.load(Z + _state_offsets(bh, t, n_blocks, fx, fw, sz_f, sz_w, state_size),
                mask=(fx[:, None] < FX) & (fw[None, :] < W), other=0.0)  # [BFX, BW] float32
    xw = (x.to(tl.float32) * w[:, None]).to(y.dtype)
    out = _mm(p.to(y.dtype), y) + _mm(xw, z.to(y.dtype))  # [BLOCK, BW]
    tl.store(OUT + _row_offsets(b, h, rows, fw, so_b, so_s, so_h), out.to(OUT.dtype.element_ty),
             mask=live & (fw[None, :] < W))


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _launch_options(*widths: int) -> dict[str, int]:
    """``num_warps``/``num_stages`` for tiles whose widest side is ``max(widths)`` (explicit, no autotune):
    4 warps up to 64 columns, else 8; two pipeline stages, one from 256 columns (head dim 256 would not
    fit two stages of its operands in shared memory)."""
    widest = max(widths)
    return {"num_warps": 4 if widest <= 64 else 8, "num_stages": 2 if widest < 256 else 1}


def _check_device(q: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise ValueError("lightning backend 'triton' computes in float32; use backend='chunk' or 'naive' for float64")
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("lightning backend 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1 on CPU")


class _Plan:
    """Shapes, block sizes and per-block decays shared by the launches of one forward or backward."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, chunk_size: int,
                 doc_ids: torch.Tensor | None) -> None:
        self.b, self.s, self.h, self.d = q.shape
        self.e = v.shape[-1]
        self.block = _pow2(chunk_size)
        self.nb = triton.cdiv(self.s, self.block)
        self.rate = decay.to(device=q.device, dtype=torch.float32).contiguous()  # [H]
        self.docs = doc_ids.to(device=q.device, dtype=torch.int64).contiguous() if doc_ids is not None else None
        self.sdoc_b = self.s if doc_ids is not None and doc_ids.shape[0] > 1 else 0
        # decay across each block, λ^{n_t}, times 0 where a document begins in it: [B·H, NB] float32
        lens = torch.full((self.nb,), self.block, device=q.device, dtype=torch.float32)
        lens[-1] = self.s - (self.nb - 1) * self.block
        dec = torch.exp(-self.rate[:, None] * lens[None, :])[None].expand(self.b, self.h, self.nb)  # [B, H, NB]
        if self.docs is not None:
            starts = torch.arange(self.nb, device=q.device) * self.block
            prev = self.docs[:, (starts - 1).clamp(min=0)]  # [R, NB]
            last = self.docs[:, (starts + self.block - 1).clamp(max=self.s - 1)]
            dec = dec * (prev == last).to(torch.float32)[:, None, :]
        self.dec = dec.contiguous()

    @property
    def doc_arg(self) -> torch.Tensor:
        return self.docs if self.docs is not None else self.rate  # unused pointer when there are no documents

    def block_states(self, a: torch.Tensor, b: torch.Tensor, *, key_weights: bool) -> torch.Tensor:
        """``[B·H, NB, FA, FB]`` float32: ``(a_t ⊙ w)ᵀ b_t`` for every block."""
        fa, fb = a.shape[-1], b.shape[-1]
        bfa, bfb = _pow2(fa), min(_pow2(fb), MAX_TILE)
        out = torch.empty(self.b * self.h, self.nb, fa, fb, device=a.device, dtype=torch.float32)
        grid = (self.nb, self.b * self.h, triton.cdiv(fb, bfb))
        _block_state_kernel[grid](a, b, out, self.doc_arg, self.rate, self.s, self.h, self.nb, fa, fb,
                                  a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
                                  self.sdoc_b, KEY_WEIGHTS=key_weights, HAS_DOCS=self.docs is not None,
                                  BLOCK=self.block, BFA=bfa, BFB=bfb, **_launch_options(self.block, bfa, bfb))
        return out

    def scan(self, x: torch.Tensor, init: torch.Tensor | None, *, reverse: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [B·H, NB, D, E], final [B, H, D, E])`` of the block scan (see ``_scan_kernel``)."""
        size = self.d * self.e
        states = torch.empty_like(x)
        final = torch.empty(self.b, self.h, self.d, self.e, device=x.device, dtype=torch.float32)
        init_arg = init.to(torch.float32).contiguous() if init is not None else final
        grid = (self.b * self.h, triton.cdiv(size, SCAN_TILE))
        _scan_kernel[grid](x, self.dec, init_arg, states, final, self.nb, size, REVERSE=reverse,
                           HAS_INIT=init is not None, BF=SCAN_TILE, num_warps=4, num_stages=1)
        return states, final

    def rows(self, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
             out: torch.Tensor, *, trans: bool, z_transposed: bool) -> torch.Tensor:
        """Launch ``_rows_kernel`` writing ``out`` ``[B, S, H, W]``; ``z`` holds ``[D, E]`` block states,
        read as ``[E, D]`` when ``z_transposed``."""
        fp, fx, w = a.shape[-1], x.shape[-1], y.shape[-1]
        bfp, bfx, bw = _pow2(fp), _pow2(fx), min(_pow2(w), MAX_TILE)
        sz_f, sz_w = (1, self.e) if z_transposed else (self.e, 1)
        grid = (self.nb, self.b * self.h, triton.cdiv(w, bw))
        _rows_kernel[grid](a, b, y, x, z, out, self.doc_arg, self.rate, self.s, self.h, self.nb, fp, fx, w,
                           *a.stride()[:3], *b.stride()[:3], *y.stride()[:3], *x.stride()[:3], *out.stride()[:3],
                           self.sdoc_b, sz_f, sz_w, self.d * self.e, TRANS=trans, HAS_DOCS=self.docs is not None,
                           BLOCK=self.block, BFP=bfp, BFX=bfx, BW=bw, **_launch_options(self.block, bfp, bfx, bw))
        return out


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
            initial_state: torch.Tensor | None = None, chunk_size: int = DEFAULT_BLOCK,
            doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward → ``(out [B, S, H, E]`` in q's dtype, ``state [B, H, D, E]`` float32)."""
    _check_device(q)
    q, k, v = q.contiguous(), k.contiguous(), v.to(q.dtype).contiguous()
    plan = _Plan(q, v, decay, chunk_size, doc_ids)
    m = plan.block_states(k, v, key_weights=True)  # [B·H, NB, D, E]
    entering, final = plan.scan(m, initial_state, reverse=False)
    out = torch.empty(plan.b, plan.s, plan.h, plan.e, dtype=q.dtype, device=q.device)
    plan.rows(q, k, v, q, entering, out, trans=False, z_transposed=False)
    return out, final


def backward(dout: torch.Tensor, dstate: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, decay: torch.Tensor, initial_state: torch.Tensor | None = None,
             chunk_size: int = DEFAULT_BLOCK, doc_ids: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Kernel backward → ``(dq, dk, dv, d_initial_state)`` (the last None without an initial state)."""
    _check_device(q)
    q, k = q.contiguous(), k.contiguous()
    v_in = v.dtype
    v, dout = v.to(q.dtype).contiguous(), dout.to(q.dtype).contiguous()
    plan = _Plan(q, v, decay, chunk_size, doc_ids)
    entering, _ = plan.scan(plan.block_states(k, v, key_weights=True), initial_state, reverse=False)
    leaving, ds0 = plan.scan(plan.block_states(q, dout, key_weights=False), dstate, reverse=True)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    plan.rows(dout, v, k, dout, entering, dq, trans=False, z_transposed=True)  # (dO Vᵀ ⊙ D) K + (dO ⊙ q_w) KVᵀ
    plan.rows(dout, v, q, v, leaving, dk, trans=True, z_transposed=True)  # (dO Vᵀ ⊙ D)ᵀ Q + (V ⊙ k_w) Gᵀ
    plan.rows(q, k, dout, k, leaving, dv, trans=True, z_transposed=False)  # (Q Kᵀ ⊙ D)ᵀ dO + (K ⊙ k_w) G
    d_initial = ds0.to(initial_state.dtype) if initial_state is not None else None
    return dq, dk, dv.to(v_in), d_initial


_TritonLightning = explicit_function(forward, backward, "_TritonLightning")


def lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
              initial_state: torch.Tensor | None = None, chunk_size: int | None = None,
              doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd-aware Triton lightning attention → ``(out [B, S, H, E], state [B, H, D, E])``."""
    return _TritonLightning.apply(q, k, v, decay, initial_state, chunk_size or DEFAULT_BLOCK, doc_ids)
