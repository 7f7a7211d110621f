"""Ring, Ulysses and hybrid (USP) context parallelism: one engine, three degrees.

The group of P ranks is split into R = P/U ring groups of U consecutive ranks each (Ulysses
groups); ``ring`` is U = 1, ``ulysses`` is U = P. Order (USP, Fang & Zhao 2024): all-to-all inside the
Ulysses group (heads ↔ sequence), ring across the strided ring group (members with the same
Ulysses index hold the same heads), inverse all-to-all.

Layout under hybrid. Every rank consumes the same global layout over the whole group (``cp_attention``),
and that layout is what the names mean under hybrid too. Because Ulysses groups are consecutive
ranks, a group's tokens are then, in global order: ``contiguous`` — one span (U chunks);
``zigzag`` — global chunks gU … gU+U−1 and their mirrors, i.e. exactly chunks g and 2R−1−g of a
zigzag over the R ring groups (USP's layout: each Ulysses group holds its two zigzag chunks, in
order); ``stripe`` — every token ≡ gU … gU+U−1 (mod P), a stripe over ring groups. The all-to-all
writes the gathered tokens straight into that global order (:class:`~.ulysses.TokenOrder`), so the
ring sees sorted positions and the block plans give it one causal call per step, with no reorder
copy of q, k, v, out or their gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

from .blocks import MaskSpec, heads_first, tile_size, token_major
from .ring import Ring, acc_dtype, ring_backward, ring_forward
from .ulysses import TokenOrder, heads_to_seq_many, seq_to_heads_many


@dataclass
class HybridPlan:
    """What one rank needs for every call with the same shapes, layout and mask (cached by ``cp_attention``)."""

    degree: int
    replicate: int
    """K/V head replication factor in the all-to-all (U / Hkv when U > Hkv, else 1)."""
    ring: Ring
    order: TokenOrder | None
    """How the Ulysses group's gathered tokens are placed in global order (None when U = 1)."""

    @classmethod
    def build(cls, *, peers: list[int], rank: int, degree: int, positions: list[torch.Tensor], seq_len: int,
              num_heads: int, kv_heads: int, mask, starts: torch.Tensor | None = None) -> "HybridPlan":
        p = len(positions)
        u, g = rank % degree, rank // degree
        rings = p // degree
        members = [[positions[gg * degree + i] for i in range(degree)] for gg in range(rings)]
        order = TokenOrder.build(members[g]) if degree > 1 else None
        sorted_pos = [torch.sort(torch.cat(m)).values for m in members]
        hl = num_heads // degree
        spec = MaskSpec(mask=mask, seq_len=seq_len, heads=torch.arange(u * hl, (u + 1) * hl), num_heads=num_heads,
                        starts=starts, tile=tile_size(sorted_pos[g].numel()))
        ring = Ring(peers=[peers[gg * degree + u] for gg in range(rings)], index=g, positions=sorted_pos, spec=spec)
        replicate = degree // kv_heads if degree > kv_heads else 1
        return cls(degree=degree, replicate=replicate, ring=ring, order=order)


@dataclass
class HybridEngine:
    """Forward/backward of one ``cp_attention`` call under ring / Ulysses / hybrid.

    Attributes:
        ulysses_group: process group of this rank's Ulysses group (None when U = 1).
        plan: the cached plan (degree, ring with its block plans, token order).
    """

    ulysses_group: dist.ProcessGroup | None
    plan: HybridPlan
    backend: ModuleType
    scale: float
    want_lse: bool

    # -- layout changes ---------------------------------------------------------------------------
    def _gather(self, xs: list[torch.Tensor], replicate: list[int], heads: list[bool]) -> list[torch.Tensor]:
        """[B, n, Hx, D] sequence-split → [B, U·n, hl, D] head-split, in global order, all of ``xs`` in one
        all-to-all per dtype/head size (``heads``: stored heads-first where the backend reads that best)."""
        if self.plan.degree == 1:
            return list(xs)
        hf = heads_first(self.backend)
        return heads_to_seq_many(xs, group=self.ulysses_group, degree=self.plan.degree, replicate=replicate,
                                 order=self.plan.order, heads=[h and hf for h in heads])

    def _scatter(self, xs: list[torch.Tensor], replicate: list[int]) -> list[torch.Tensor]:
        """Inverse of :meth:`_gather`."""
        if self.plan.degree == 1:
            return list(xs)
        return seq_to_heads_many(xs, group=self.ulysses_group, degree=self.plan.degree, replicate=replicate,
                                 order=self.plan.order)

    # -- passes -----------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """q ``[B, n, H, D]``, k/v ``[B, n, Hkv, D|E]`` → out ``[B, n, H, E]``, lse ``[B, H, n]`` (or empty), saved."""
        rep = self.plan.replicate
        # [B, U·n, H/U, D], [B, U·n, Hkv/U or 1, D|E]
        qh, kh, vh = self._gather([q, k, v], [1, rep, rep], [True, True, True])
        out, lse = ring_forward(self.plan.ring, self.backend, qh, kh, vh, scale=self.scale)
        if self.plan.degree == 1:  # the caller's layout
            out_h = token_major(out, q.dtype)
        else:
            out_h = out.to(q.dtype)  # [B, U·n, H/U, E]; the all-to-all's copy reads either layout
        del out
        out_local, = self._scatter([out_h], [1])  # [B, n, H, E]
        lse_local = torch.empty(0, dtype=lse.dtype, device=lse.device)
        if self.want_lse:
            l, = self._scatter([lse.transpose(1, 2).unsqueeze(-1)], [1])  # [B, n, H, 1]
            lse_local = l.squeeze(-1).transpose(1, 2).contiguous()  # [B, H, n]
        if self.regather:
            # out: the sequence-split tensor the caller keeps anyway (its output projection saves it), not a
            # head-split copy of it. q, k and v are kept head-split: the same bytes as the local tensors
            # (nothing else holds those after RoPE and the projections), and no all-to-all to redo; K/V
            # heads replicated r times would be r times the bytes, so those stay local and travel again.
            if rep > 1:
                return out_local, lse_local, (qh, k, v, out_local, lse)
            return out_local, lse_local, (qh, kh, vh, out_local, lse)
        return out_local, lse_local, (qh, kh, vh, out_h, lse)

    @property
    def regather(self) -> bool:
        """Hybrid (1 < U < P) saves the local out (and local K/V when their heads are replicated) and redoes
        its all-to-all in the backward, together with dout's, so its saved memory is ring's (a head-split
        copy would add one out per layer). Ulysses
        (U = P) keeps the head-split out, as DeepSpeed's Ulysses does. Either way a pass is four
        all-to-alls: q/k/v and out forward, dout (with hybrid's out) and dq/dk/dv backward (DeepSpeed's
        Ulysses makes eight: one per tensor); dq/dk/dv of batch 1 from
        :func:`~.ulysses.alone_bytes` on travel one each, uncopied (six)."""
        return self.plan.degree > 1 and self.plan.ring.size > 1

    def backward(self, dout: torch.Tensor, saved: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rep = self.plan.replicate
        qh, kh, vh, out_saved, lse = saved
        if self.regather and rep > 1:  # local K/V, out and dout in one all-to-all
            kh, vh, out_h, dh = self._gather([kh, vh, out_saved, dout], [rep, rep, 1, 1], [True, True, True, False])
        elif self.regather:  # out and dout in one all-to-all
            out_h, dh = self._gather([out_saved, dout], [1, 1], [True, False])
        else:
            out_h = out_saved
            dh, = self._gather([dout], [1], [False])  # [B, U·n, H/U, E]
        dq, dk, dv = ring_backward(self.plan.ring, self.backend, dh, qh, kh, vh, out_h, lse, scale=self.scale,
                                   kv_summed=rep > 1)
        # replicated K/V heads: sum the replicas' gradients in float32, round once (their own all-to-all
        # then, as their dtype differs from dq's)
        kv_dtype = acc_dtype(kh.dtype) if rep > 1 else kh.dtype
        dq, dk, dv = self._scatter([dq.to(qh.dtype), dk.to(kv_dtype), dv.to(kv_dtype)], [1, rep, rep])
        return dq, dk.to(kh.dtype), dv.to(vh.dtype)
