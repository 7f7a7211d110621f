"""Sequence parallelism for lightning (linear) attention: LASP-1 and LASP-2.

The sequence is cut into chunks of n tokens laid out over the context-parallel ranks exactly as
``shard_sequence`` does (contiguous: chunk r on rank r; zigzag: chunks r and 2P−1−r on rank r). Per
head, λ = e^{−s}. Every chunk t computes, with local work only, its intra-chunk output and its end
state with a zero start, ``M_t = Σ_j λ^{n−1−j} k_jᵀ v_j`` (``[D, E]``, independent of n). The state
entering chunk t is ``KV_t = Σ_{u<t} λ^{n(t−1−u)} M_u`` and adds ``λ^{i+1} q_i KV_t`` to row i.

* **LASP-1** passes KV along the chunk order: receive KV_t from chunk t−1's rank, send
  ``λ^n KV_t + M_t`` to chunk t+1's rank; backward passes dKV the other way. Under zigzag the chunk
  order is a chain out (ranks 0→P−1) and back (P−1→0).
* **LASP-2** all-gathers every chunk's M_t once and takes the prefix in chunk order, so it works with
  any chunk→rank assignment; backward all-gathers dKV_t and takes suffix sums.

Packed documents (``cu_seqlens``, global offsets) restart the state: each chunk's local kernel resets
at the documents inside it (so M_t holds only its last document), the state crosses chunk t only when
no document begins in it (a 0/1 ``crossing_t``, computed from the offsets on every rank, no
communication), and the entering state reaches only the queries of the chunk's first document.

The stripe layout interleaves single tokens over ranks, so there are no chunks to pass a state
between: it is rejected. Both variants are explicit ``autograd.Function``s around the communication;
the local chunk work is lightning attention (:func:`longreach.kernels.lightning.lightning_by_document_ids`)
with its own backward. All communication goes through :mod:`longreach.parallel.comm`, so a
``CommRecorder`` counts its bytes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longreach.kernels.lightning import document_ids, lightning_by_document_ids
from longreach.kernels.lightning.documents import CuSeqlens

from .comm import all_gather_into, group_ranks, p2p
from .config import LINEAR_VARIANTS
from .layouts import group_rank_size

__all__ = ["LASP_VARIANTS", "chunk_owner", "linear_cp_attention", "local_chunks"]

LASP_VARIANTS = LINEAR_VARIANTS


def local_chunks(layout: str, rank: int, world_size: int) -> list[int]:
    """Global chunk ids held by ``rank``, in the order ``shard_sequence`` stores them."""
    if layout == "contiguous":
        return [rank]
    if layout == "zigzag":
        return [rank, 2 * world_size - 1 - rank]
    raise ValueError(
        f"linear_cp_attention: layout={layout!r} is not supported; LASP passes states between contiguous "
        "chunks, so use layout 'contiguous' or 'zigzag' ('stripe' interleaves single tokens across ranks)"
    )


def chunk_owner(layout: str, chunk: int, world_size: int) -> int:
    """Rank holding global chunk ``chunk``."""
    if layout == "contiguous":
        return chunk
    return chunk if chunk < world_size else 2 * world_size - 1 - chunk


def _send(t: torch.Tensor, group_rank: int, group: dist.ProcessGroup | None) -> None:
    for work in p2p([(t.contiguous(), group_ranks(group)[group_rank], 0)], []):
        work.wait()


def _recv(like: torch.Tensor, group_rank: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    buf = torch.empty_like(like)
    for work in p2p([], [(buf, group_ranks(group)[group_rank], 0)]):
        work.wait()
    return buf


def _chunk_decay(decay: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """λ^n per head, shaped to multiply ``[B, H, D, E]`` states."""
    return torch.exp(-decay.to(device=like.device, dtype=like.dtype) * n)[None, :, None, None]


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, size: int) -> torch.Tensor:
    """``x [L, ...]`` from every rank → ``[P, L, ...]`` in group-rank order."""
    if size == 1:
        return x[None]
    out = x.new_empty(size * x.shape[0], *x.shape[1:])
    all_gather_into(out, x, group=group)
    return out.view(size, *x.shape)


def _in_chunk_order(parts: torch.Tensor, layout: str, nchunks: int, size: int) -> list[torch.Tensor]:
    """Per-rank gathered chunk tensors ``[P, L, …]`` rearranged into global chunk order."""
    out = []
    for t in range(nchunks):
        owner = chunk_owner(layout, t, size)
        out.append(parts[owner][local_chunks(layout, owner, size).index(t)])
    return out


def _chunk_carry(lam: torch.Tensor, crossing: torch.Tensor | None, t: int) -> torch.Tensor:
    """Factor of the state crossing chunk t: λ^n, times 0 where a document begins in the chunk."""
    return lam if crossing is None else lam * crossing[t].to(lam.dtype)


def _backward_setup(ctx: Any, d_entering: torch.Tensor) -> tuple:
    """What both state-passing backwards start from: (group, layout, rank, size, this rank's chunks, chunk
    count, contiguous d_entering ``[L, B, H, D, E]``, per-chunk decay λ^n ``[1, H, 1, 1]``)."""
    group, layout = ctx.group, ctx.layout
    rank, size = group_rank_size(group)
    mine = local_chunks(layout, rank, size)
    d_entering = d_entering.contiguous()
    lam = _chunk_decay(ctx.decay, ctx.n, d_entering)
    return group, layout, rank, size, mine, len(mine) * size, d_entering, lam


class _Lasp2States(torch.autograd.Function):
    """``M_local [L, B, H, D, E]`` → entering states of the local chunks ``[L, B, H, D, E]``.

    ``crossing`` ``[N_chunks, 1 | B, 1, 1, 1]`` (0/1, or None: all 1) says whether the state crosses chunk t.
    """

    @staticmethod
    def forward(ctx, m_local, decay, n, layout, group, crossing=None):
        rank, size = group_rank_size(group)
        mine = local_chunks(layout, rank, size)
        nchunks = len(mine) * size
        lam = _chunk_decay(decay, n, m_local)  # [1, H, 1, 1]
        parts = _all_gather(m_local, group, size)  # [P, L, B, H, D, E]
        m_all = _in_chunk_order(parts, layout, nchunks, size)  # each [B, H, D, E]
        kv = torch.zeros_like(m_local[0])
        entering = []
        for t in range(nchunks):
            entering.append(kv)
            kv = _chunk_carry(lam, crossing, t) * kv + m_all[t]
        ctx.decay, ctx.n, ctx.layout, ctx.group, ctx.crossing = decay, n, layout, group, crossing
        return torch.stack([entering[t] for t in mine])

    @staticmethod
    def backward(ctx, d_entering):
        group, layout, rank, size, mine, nchunks, d_entering, lam = _backward_setup(ctx, d_entering)
        parts = _all_gather(d_entering, group, size)  # [P, L, B, H, D, E]
        g_all = _in_chunk_order(parts, layout, nchunks, size)
        # dM_u = Σ_{t>u} λ^{n(t−1−u)} dKV_t: a suffix scan in chunk order
        acc = torch.zeros_like(d_entering[0])
        dm = [acc] * nchunks
        for u in range(nchunks - 1, -1, -1):
            dm[u] = acc
            acc = g_all[u] + _chunk_carry(lam, ctx.crossing, u) * acc
        return torch.stack([dm[t] for t in mine]), None, None, None, None, None


class _Lasp1States(torch.autograd.Function):
    """Same contract as :class:`_Lasp2States`, by passing the state along the chunk chain."""

    @staticmethod
    def forward(ctx, m_local, decay, n, layout, group, crossing=None):
        rank, size = group_rank_size(group)
        mine = local_chunks(layout, rank, size)
        nchunks = len(mine) * size
        lam = _chunk_decay(decay, n, m_local)
        entering: dict[int, torch.Tensor] = {}
        carry = None
        for t in sorted(mine):  # a rank's chunks in chunk order: the chain visits them in this order
            m_t = m_local[mine.index(t)]
            if t == 0:
                kv_in = torch.zeros_like(m_t)
            elif chunk_owner(layout, t - 1, size) == rank:
                kv_in = carry
            else:
                kv_in = _recv(m_t, chunk_owner(layout, t - 1, size), group)
            entering[t] = kv_in
            kv_out = _chunk_carry(lam, crossing, t) * kv_in + m_t
            if t + 1 < nchunks:
                if chunk_owner(layout, t + 1, size) == rank:
                    carry = kv_out
                else:
                    _send(kv_out, chunk_owner(layout, t + 1, size), group)
        ctx.decay, ctx.n, ctx.layout, ctx.group, ctx.crossing = decay, n, layout, group, crossing
        return torch.stack([entering[t] for t in mine])

    @staticmethod
    def backward(ctx, d_entering):
        group, layout, rank, size, mine, nchunks, d_entering, lam = _backward_setup(ctx, d_entering)
        dm: dict[int, torch.Tensor] = {}
        carry = None
        for t in sorted(mine, reverse=True):
            g_in = d_entering[mine.index(t)]
            # x: gradient of the state leaving chunk t, which is dM_t
            if t == nchunks - 1:
                x = torch.zeros_like(g_in)
            elif chunk_owner(layout, t + 1, size) == rank:
                x = carry
            else:
                x = _recv(g_in, chunk_owner(layout, t + 1, size), group)
            dm[t] = x
            g_prev = g_in + _chunk_carry(lam, ctx.crossing, t) * x  # gradient of the state leaving chunk t−1
            if t > 0:
                if chunk_owner(layout, t - 1, size) == rank:
                    carry = g_prev
                else:
                    _send(g_prev, chunk_owner(layout, t - 1, size), group)
        return torch.stack([dm[t] for t in mine]), None, None, None, None, None


def _document_factors(cu_seqlens: CuSeqlens, mine: list[int], n: int, nchunks: int, batch: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Document ids of the local chunks and the 0/1 factors of the chunk chain, from global offsets.

    Returns:
        doc_ids ``[L·(1|B), n]`` (row l·R + r: local chunk l, batch row r), q_keep ``[L, 1|B, n]``
        (query in the document of the state entering its chunk), crossing ``[N_chunks, 1|B, 1, 1, 1]``.
    """
    seq_len = nchunks * n
    local = torch.tensor(mine, device=device)[:, None] * n + torch.arange(n, device=device)  # [L, n] global
    starts = torch.arange(nchunks, device=device) * n
    edges = torch.cat([(starts - 1).clamp(min=0), starts + n - 1])  # token before / last token of each chunk
    ids = document_ids(cu_seqlens, torch.cat([local.reshape(-1), edges]), batch=batch, seq_len=seq_len)
    r = ids.shape[0]
    mine_ids = ids[:, :local.numel()].view(r, len(mine), n).transpose(0, 1)  # [L, R, n]
    prev, last = ids[:, local.numel():].view(r, 2, nchunks).unbind(1)  # [R, N] each
    q_keep = mine_ids == prev[:, mine].transpose(0, 1)[..., None]  # [L, R, n]
    crossing = (prev == last).transpose(0, 1)[:, :, None, None, None]  # [N, R, 1, 1, 1]
    return mine_ids.reshape(-1, n), q_keep, crossing


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, variant: str, layout: str,
           n_local_chunks: int) -> None:
    if variant not in LASP_VARIANTS:
        raise ValueError(f"linear_cp_attention: variant={variant!r}; choose one of {', '.join(LASP_VARIANTS)}")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"linear_cp_attention: q, k must be [B, S_local, H, D] and v [B, S_local, H, E]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(decay, torch.Tensor) or decay.shape != (q.shape[2],):
        raise ValueError(f"linear_cp_attention: decay must be a [H] = [{q.shape[2]}] tensor of rates")
    if q.shape[1] == 0 or q.shape[1] % n_local_chunks != 0:
        raise ValueError(f"linear_cp_attention: local length {q.shape[1]} does not split into {n_local_chunks} "
                         f"equal chunks as layout={layout!r} needs")


def lasp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, *,
                   variant: str = "lasp2", layout: str, group: dist.ProcessGroup | None = None,
                   backend: str = "auto", cu_seqlens: CuSeqlens = None) -> torch.Tensor:
    """:func:`linear_cp_attention` with a choice of local lightning kernel."""
    rank, size = group_rank_size(group)
    mine = local_chunks(layout, rank, size)
    _check(q, k, v, decay, variant, layout, len(mine))
    b, s_local, h, d = q.shape
    nl = len(mine)
    n = s_local // nl
    e = v.shape[-1]

    def per_chunk(x: torch.Tensor) -> torch.Tensor:  # [B, L·n, H, X] → [L·B, n, H, X]
        return x.view(b, nl, n, h, x.shape[-1]).transpose(0, 1).reshape(nl * b, n, h, x.shape[-1])

    qc = per_chunk(q)
    doc_ids = q_keep = crossing = None
    if cu_seqlens is not None:
        doc_ids, q_keep, crossing = _document_factors(cu_seqlens, mine, n, nl * size, b, q.device)
        if doc_ids.shape[0] != nl * b:  # offsets shared by every row: one row of ids per chunk → L·B rows
            doc_ids = doc_ids.view(nl, 1, n).expand(nl, b, n).reshape(nl * b, n)
    out, m = lightning_by_document_ids(qc, per_chunk(k), per_chunk(v), decay, doc_ids, backend=backend)
    # out [L·B, n, H, E]; m [L·B, H, D, E] (float32, float64 for float64)
    m = m.view(nl, b, h, d, e)
    fn = _Lasp2States if variant == "lasp2" else _Lasp1States
    entering = fn.apply(m, decay, n, layout, group, crossing).reshape(nl * b, h, d, e)  # [L·B, H, D, E]
    rate = decay.to(device=q.device, dtype=m.dtype)
    q_w = torch.exp(-rate[None, None, :] * torch.arange(1, n + 1, device=q.device, dtype=m.dtype)[None, :, None])
    if q_keep is not None:  # [1, n, H] → [L·B, n, H]: the entering state feeds the chunk's first document only
        q_w = q_w * q_keep.to(m.dtype).expand(nl, b, n).reshape(nl * b, n)[..., None]
    inter = torch.einsum("cihd,chde,cih->cihe", qc.to(m.dtype), entering, q_w.expand(nl * b, n, h))  # [L·B, n, H, E]
    out = (out.to(m.dtype) + inter).to(q.dtype)
    return out.view(nl, b, n, h, e).transpose(0, 1).reshape(b, s_local, h, e)


def linear_cp_attention(q, k, v, decay, *, variant="lasp2", layout, group=None, cu_seqlens=None):
    """Lightning attention over a sequence sharded across the context-parallel group.

    Args:
        q, k: ``[B, S_local, H, D]``; v: ``[B, S_local, H, E]`` — this rank's part of the sequence, as
            ``shard_sequence(x, layout=layout, group=group)`` gives it.
        decay: ``[H]`` per-head rates s_h >= 0 (same on every rank).
        variant: ``"lasp2"`` (one all-gather of chunk states, any layout) or ``"lasp1"`` (state passed
            rank to rank along the chunk order).
        layout: ``"contiguous"`` or ``"zigzag"``; ``"stripe"`` raises.
        group: the context-parallel process group (default WORLD).
        cu_seqlens: packed documents as GLOBAL offsets (``[n+1]`` shared by every row, or one per row),
            as ``lightning_attention`` takes them for the whole sequence; None: one document.

    Returns:
        out_local ``[B, S_local, H, E]`` equal to this rank's shard of single-rank
        ``lightning_attention`` over the whole sequence (with the same ``cu_seqlens``). Differentiable
        in q, k and v.
    """
    return lasp_attention(q, k, v, decay, variant=variant, layout=layout, group=group, cu_seqlens=cu_seqlens)
