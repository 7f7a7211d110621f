"""Run a slice plan on a device's dense kernel: one batched call per bucket, results merged by LSE.

A *runner* wraps one device kernel in ``[N, H, S, D]`` layout (units stacked in N):

    forward(q, k, v, *, causal, mask, scale, window=None) -> (out [N, Hg, m, E], lse [N, Hg, m] float32)
    backward(dout, q, k, v, out, lse, *, causal, mask, scale, window=None) -> (dq, dk, dv)

with q ``[N, Hg, m, D]``, k/v ``[N, Hk, n, D|E]`` (Hk divides Hg, GQA inside the call), ``causal`` square and
diagonal-aligned, ``mask`` None or ``bool [N, Hd, m, n]`` (rows it leaves empty must come back as out = 0,
lse = −inf). ``window = (left, right)`` accompanies the mask of a band bucket and says the same thing in
flash-attn's terms (keys ``r + n − m − left … r + n − m + right`` for row r), so a kernel with native
windows runs it without the mask. ``backward`` receives the *global* out and lse of its rows (finite: rows empty everywhere have
no unit), so every unit's gradients are exact for the whole attention, as context parallelism needs.

Tensors are viewed as ``[S·H, B, D]`` (a free view for B = 1) so that gathering a bucket's cells and
scattering its results are single ``index_select`` / ``index_copy_`` / ``index_add_`` calls on dim 0.
A *regular* bucket (equally spaced row and key runs on one head range: S2 groups, band units, aligned
diagonals) skips the copies when B = 1: its units are strided views of the inputs and of the results; K/V
units may overlap (bands), so their gradients are added in groups of non-overlapping units.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..dense.reference import grad_compute_dtype
from ..masks import PlacedMask
from .plan import CAUSAL_KIND, Bucket, get_plan

__all__ = ["Runner", "forward", "backward"]


class Runner(Protocol):
    def forward(self, q, k, v, *, causal: bool, mask: torch.Tensor | None, scale: float,
                window: tuple[int, int] | None = None): ...

    def backward(self, dout, q, k, v, out, lse, *, causal: bool, mask: torch.Tensor | None, scale: float,
                 window: tuple[int, int] | None = None): ...


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cells(x: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, *]`` → ``[S·H, B, *]`` (a view when B = 1)."""
    return x.movedim(0, 2).reshape(x.shape[1] * x.shape[2], x.shape[0], *x.shape[3:])


def _blocks(cells: torch.Tensor, index: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cells, index)`` in units of ``block`` consecutive cells when the index is made of such blocks
    (whole key blocks of PowerAttention: one copy per block instead of one per cell)."""
    if block > 1 and cells.shape[0] % block == 0 and cells.is_contiguous():
        return cells.view(cells.shape[0] // block, block, *cells.shape[1:]), index[::block] // block
    return cells, index


def _gather(cells: torch.Tensor, index: torch.Tensor, shape: tuple[int, int, int], block: int = 1) -> torch.Tensor:
    """Cells ``[S·H, B, *]`` at ``index`` → units ``[U·B, Hg, m, *]`` (``shape`` = (U, m, Hg)); ``index`` is
    made of runs of ``block`` cells starting at multiples of ``block``."""
    u, m, hg = shape
    src, idx = _blocks(cells, index, block)
    g = src.index_select(0, idx).view(u, m, hg, *cells.shape[1:])  # [U, m, Hg, B, *]
    return g.movedim(3, 1).transpose(2, 3).reshape(u * cells.shape[1], hg, m, *cells.shape[2:])


def _cells_of(x: torch.Tensor, u: int) -> torch.Tensor:
    """Unit results ``[U·B, Hg, m, *]`` → ``[U·m·Hg, B, *]`` (the order of ``Bucket.q_index``)."""
    x = x.view(u, x.shape[0] // u, *x.shape[1:]).transpose(2, 3).movedim(1, 3)  # [U, m, Hg, B, *]
    return x.reshape(-1, *x.shape[3:])


def _unit_mask(mask: torch.Tensor | None, u: int, b: int) -> torch.Tensor | None:
    """Bucket mask ``[U | 1, Hd, m, n]`` → ``[U·B, Hd, m, n]`` (a stride-0 view when shared by every unit)."""
    if mask is None:
        return None
    if mask.shape[0] == 1:
        return mask.expand(u * b, *mask.shape[1:])
    return mask[:, None].expand(u, b, *mask.shape[1:]).reshape(u * b, *mask.shape[1:])


def _units(x: torch.Tensor, start: int, step: int, u: int, m: int, head0: int, hg: int) -> torch.Tensor:
    """Units ``[U, Hg, m, *]`` of ``x [1, S, H, *]`` (any strides) as a view: unit i holds rows
    ``start + i·step + [0, m)`` and heads ``head0 + [0, Hg)``. Units may overlap."""
    st = x.stride()
    return x.as_strided((u, hg, m, *x.shape[3:]), (step * st[1], st[2], st[1], *st[3:]),
                        x.storage_offset() + start * st[1] + head0 * st[2])


def _add_units(view: torch.Tensor, grad: torch.Tensor, n: int, step: int) -> None:
    """``view += grad`` for unit views ``[U, H, n, *]`` spaced ``step`` rows apart, which overlap when
    ``step < n`` (band units: K/V of query units, queries of key units): added in ⌈n / step⌉ groups of
    non-overlapping units (``step = 0``: one summed unit)."""
    u = view.shape[0]
    if u == 1 or step >= n:
        view.add_(grad)
    elif step == 0:
        view[0].add_(grad.sum(0))
    else:
        groups = -(-n // step)
        for t in range(groups):
            view[t::groups].add_(grad[t::groups])


def _shapes(bucket: Bucket) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    u, m = bucket.rows.shape
    return (u, m, bucket.heads.shape[1]), (u, bucket.keys.shape[1], bucket.kv_heads.shape[1])


def _window(bucket: Bucket) -> tuple[int, int] | None:
    """A band bucket's mask as a flash-attn window (left, right) around the bottom-right diagonal
    (:attr:`Bucket.window`)."""
    return bucket.window


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, placed: PlacedMask, scale: float,
            runner: Runner, *, tiles: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, Sq, H, D]`` over ``k/v [B, Sk, Hkv, D|E]`` under ``placed``.

    Returns out ``[B, Sq, H, E]`` (q dtype) and lse ``[B, H, Sq]`` float32 (float64 for float64 inputs).
    ``tiles`` runs the tile plan instead of the mask's analytic slices.
    """
    b, sq, h, _ = q.shape
    sk, hkv, e = k.shape[1], k.shape[2], v.shape[-1]
    acc = _acc_dtype(q)
    plan = get_plan(placed, sq, sk, h, hkv, tiles=tiles)
    if len(plan.buckets) == 1 and plan.buckets[0].identity:
        causal = plan.buckets[0].kind == CAUSAL_KIND
        o, l = runner.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, mask=None,
                              scale=scale)  # [B, H, Sq, E], [B, H, Sq]
        return o.transpose(1, 2).to(q.dtype).contiguous(), l.to(acc).contiguous()
    out = torch.zeros(sq * h, b, e, dtype=acc, device=q.device)  # cells [Sq·H, B, E]
    lse = torch.full((sq * h, b), float("-inf"), dtype=acc, device=q.device)  # cells [Sq·H, B]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    qc, kc, vc = _cells(q), _cells(k), _cells(v)
    for bucket in plan.buckets:
        qi, ki, mask = bucket.on(q.device)
        qs, ks = _shapes(bucket)
        if b == 1 and (bucket.regular is not None or bucket.split):
            for part in bucket.split or [bucket]:
                _forward_regular(part, q, k, v, out.view(sq, h, 1, e).permute(2, 0, 1, 3),
                                 lse.view(sq, h, 1).permute(2, 0, 1),
                                 _unit_mask(part.on(q.device)[2], part.rows.shape[0], 1), scale, runner)
            continue
        o, l = runner.forward(_gather(qc, qi, qs, bucket.q_block), _gather(kc, ki, ks, bucket.k_block),
                              _gather(vc, ki, ks, bucket.k_block),
                              causal=bucket.kind == CAUSAL_KIND, mask=_unit_mask(mask, qs[0], b), scale=scale,
                              window=_window(bucket))
        o, l = _cells_of(o, qs[0]).to(acc), _cells_of(l, qs[0]).to(acc)  # [U·m·Hg, B, E], [U·m·Hg, B]
        if not bucket.first:
            mo, ml = out.index_select(0, qi), lse.index_select(0, qi)
            _merge_into(mo, ml, o, l)
            o, l = mo, ml
        out.index_copy_(0, qi, o)
        lse.index_copy_(0, qi, l)
    out = out.view(sq, h, b, e).movedim(2, 0)  # [B, Sq, H, E]
    return out.to(q.dtype).contiguous(), lse.view(sq, h, b).permute(2, 1, 0).contiguous()


def _merge_into(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> None:
    """Merge a bucket's ``(o [..., E], l [...])`` into the running ``(out, lse)`` in place (float32/64).

    The stable form of :func:`longreach.kernels.merge.merge_attention`, O ← O − σ(Lb − L)(O − Ob), as one
    ``lerp_`` pass over the outputs (the merge runs over every row a later bucket covers); a row empty on
    both sides (σ of NaN) keeps O = 0, L = −inf.
    """
    w = torch.sigmoid(l.to(lse.dtype) - lse).nan_to_num_(0.0)  # [...]
    out.lerp_(o.to(out.dtype), w.unsqueeze(-1))
    lse.copy_(torch.logaddexp(lse, l.to(lse.dtype)))


def _forward_regular(bucket: Bucket, q, k, v, out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, runner: Runner) -> None:
    """One regular bucket on strided views (B = 1), written into ``out [1, Sq, H, E]`` and ``lse [1, Sq, H]``
    (views of the executor's cells), merged by LSE unless the bucket is the first to write its rows."""
    r0, rs, k0, ks, h0, kh0 = bucket.regular
    (u, m, hg), (_, n, hk) = _shapes(bucket)
    o, l = runner.forward(_units(q, r0, rs, u, m, h0, hg), _units(k, k0, ks, u, n, kh0, hk),
                          _units(v, k0, ks, u, n, kh0, hk), causal=bucket.kind == CAUSAL_KIND, mask=mask,
                          scale=scale, window=_window(bucket))  # [U, Hg, m, E], [U, Hg, m]
    ov, lv = _units(out, r0, rs, u, m, h0, hg), _units(lse, r0, rs, u, m, h0, hg)
    if bucket.first:
        ov.copy_(o)
        lv.copy_(l)
    else:
        _merge_into(ov, lv, o, l)


#: Bytes of K/V gradient per runner call of a regular backward: the CPU kernel returns zero-filled gradient
#: buffers, and buffers past glibc's mmap threshold (32 MiB at most) are fresh pages on every call.
GRAD_CALL_BYTES = 2 << 20


def _backward_regular(bucket: Bucket, tensors: tuple, grads: tuple, mask: torch.Tensor | None, scale: float,
                      runner: Runner) -> None:
    """One regular bucket's gradients (B = 1) added into ``grads`` = (dq, dk, dv) ``[1, S, H, *]`` views, in
    calls of at most :data:`GRAD_CALL_BYTES` of K/V gradient."""
    r0, rs, k0, ks, h0, kh0 = bucket.regular
    (u, m, hg), (_, n, hk) = _shapes(bucket)
    dout, q, k, v, out, lse = tensors  # lse as [1, Sq, H]
    dq, dk, dv = grads
    per_unit = max(m * hg * q.shape[-1], n * hk * (k.shape[-1] + v.shape[-1])) * k.element_size()
    step = max(1, GRAD_CALL_BYTES // per_unit)
    for a in range(0, u, step):
        c = min(step, u - a)
        ra, ka = r0 + a * rs, k0 + a * ks
        rows = [_units(x, ra, rs, c, m, h0, hg) for x in (dout, q, out, lse)]
        keys = [_units(x, ka, ks, c, n, kh0, hk) for x in (k, v)]
        gq, gk, gv = runner.backward(rows[0], rows[1], *keys, rows[2], rows[3], causal=bucket.kind == CAUSAL_KIND,
                                     mask=None if mask is None else mask[a:a + c], scale=scale,
                                     window=_window(bucket))
        _add_units(_units(dq, ra, rs, c, m, h0, hg), gq, m, rs)
        _add_units(_units(dk, ka, ks, c, n, kh0, hk), gk, n, ks)
        _add_units(_units(dv, ka, ks, c, n, kh0, hk), gv, n, ks)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, placed: PlacedMask, scale: float, runner: Runner, *, tiles: bool = False,
             grad_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients given the *global* out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]`` of the query rows.

    Returns dq, dk, dv shaped like q, k, v, in ``grad_dtype`` (None: the input dtypes). The runner returns
    gradients in its input dtype, so for ``grad_dtype`` wider than the inputs (float32 for bf16) every
    unit runs on inputs converted to it: no partial gradient is rounded to bf16 before the sum.
    """
    b, sq, h, d = q.shape
    sk, hkv, e = k.shape[1], k.shape[2], v.shape[-1]
    gdq, gdk, gdv = (grad_dtype or x.dtype for x in (q, k, v))
    cd = grad_compute_dtype(q.dtype, grad_dtype)
    q, k, v, dout, out = (x.to(cd) for x in (q, k, v, dout, out))
    acc = _acc_dtype(q)
    plan = get_plan(placed, sq, sk, h, hkv, tiles=tiles)
    # rows with no allowed key anywhere belong to no full/causal unit; a finite lse keeps masked tiles finite
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).to(acc)
    if not (len(plan.buckets) == 1 and plan.buckets[0].identity):
        plan = get_plan(placed, sq, sk, h, hkv, tiles=tiles, backward=True)
    if len(plan.buckets) == 1 and plan.buckets[0].identity:
        gq, gk, gv = runner.backward(dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     out.transpose(1, 2), lse.contiguous(),
                                     causal=plan.buckets[0].kind == CAUSAL_KIND, mask=None, scale=scale)
        return (gq.transpose(1, 2).to(gdq).contiguous(), gk.transpose(1, 2).to(gdk).contiguous(),
                gv.transpose(1, 2).to(gdv).contiguous())
    dq = torch.zeros(sq * h, b, d, dtype=acc, device=q.device)  # cells [Sq·H, B, D]
    dk = torch.zeros(sk * hkv, b, d, dtype=acc, device=q.device)  # cells [Sk·Hkv, B, D]
    dv = torch.zeros(sk * hkv, b, e, dtype=acc, device=q.device)  # cells [Sk·Hkv, B, E]
    q, k, v, dout, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dout, out))
    qc, kc, vc, doc, oc = (_cells(x) for x in (q, k, v, dout, out))
    lc = lse.permute(2, 1, 0).reshape(sq * h, b)  # cells [Sq·H, B]
    grads4 = (dq.view(sq, h, b, d).permute(2, 0, 1, 3), dk.view(sk, hkv, b, d).permute(2, 0, 1, 3),
              dv.view(sk, hkv, b, e).permute(2, 0, 1, 3))  # [B, S, H, *] views of the cells
    for bucket in plan.buckets:
        qi, ki, mask = bucket.on(q.device)
        qs, ks = _shapes(bucket)
        u, m, hg = qs
        if b == 1 and (bucket.regular is not None or bucket.split):
            for part in bucket.split or [bucket]:
                _backward_regular(part, (dout, q, k, v, out, lse.transpose(1, 2)), grads4,
                                  _unit_mask(part.on(q.device)[2], part.rows.shape[0], 1), scale, runner)
            continue
        lg = lc.index_select(0, qi).view(u, m, hg, b).permute(0, 3, 2, 1).reshape(u * b, hg, m)
        gq, gk, gv = runner.backward(
            *(_gather(x, qi, qs, bucket.q_block) for x in (doc, qc)), _gather(kc, ki, ks, bucket.k_block),
            _gather(vc, ki, ks, bucket.k_block), _gather(oc, qi, qs, bucket.q_block),
            lg.contiguous(), causal=bucket.kind == CAUSAL_KIND, mask=_unit_mask(mask, u, b), scale=scale,
            window=_window(bucket),
        )
        for grad, g, index, block in ((dq, gq, qi, bucket.q_block), (dk, gk, ki, bucket.k_block),
                                      (dv, gv, ki, bucket.k_block)):
            dst, idx = _blocks(grad, index, block)
            dst.index_add_(0, idx, _cells_of(g, u).to(acc).reshape(-1, *dst.shape[1:]))
    return (dq.view(sq, h, b, d).movedim(2, 0).to(gdq).contiguous(),
            dk.view(sk, hkv, b, d).movedim(2, 0).to(gdk).contiguous(),
            dv.view(sk, hkv, b, e).movedim(2, 0).to(gdv).contiguous())
