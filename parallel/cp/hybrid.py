"""Ring, Ulysses and hybrid (USP) context parallelism: one engine, three degrees.

The group of P ranks is split into R = P/U ring groups of U consecutive ranks each (Ulysses
groups); ``ring`` is U = 1, ``ulysses`` is U = P. Order (METHODS.md "Hybrid"): all-to-all inside the
Ulysses group (heads ↔ sequence), ring across the strided ring group (members with the same
Ulysses index hold the same heads), inverse all-to-all. Every rank consumes the same global layout;
after the all-to-all a Ulysses group holds the union of its members' positions, which this engine
sorts into global order so runs of consecutive positions (a zigzag pair across ring groups under
global zigzag) are visible to the block plans.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

from .blocks import MaskSpec
from .ring import Ring, ring_backward, ring_forward
from .ulysses import heads_to_seq, seq_to_heads


@dataclass
class HybridEngine:
    """Forward/backward of one ``cp_attention`` call under ring / Ulysses / hybrid.

    Attributes:
        ulysses_group: process group of this rank's Ulysses group (None when U = 1).
        degree: U.
        replicate: K/V head replication factor in the all-to-all (U / Hkv when U > Hkv, else 1).
        ring: the ring across Ulysses groups, with this rank's block plans.
        perm: order that sorts the Ulysses group's gathered tokens by global position (None: already sorted).
    """

    ulysses_group: dist.ProcessGroup | None
    degree: int
    replicate: int
    ring: Ring
    perm: torch.Tensor | None
    backend: ModuleType
    scale: float
    want_lse: bool

    @classmethod
    def build(cls, *, group: dist.ProcessGroup | None, ulysses_group: dist.ProcessGroup | None, peers: list[int],
              rank: int, degree: int, positions: list[torch.Tensor], seq_len: int, num_heads: int,
              kv_heads: int, mask, backend: ModuleType, scale: float, want_lse: bool,
              k_tile: int | None, starts: torch.Tensor | None = None) -> "HybridEngine":
        p = len(positions)
        u, g = rank % degree, rank // degree
        rings = p // degree
        unions = [torch.cat([positions[gg * degree + i] for i in range(degree)]) for gg in range(rings)]
        mine = unions[g]
        perm = torch.argsort(mine)
        if bool((perm == torch.arange(perm.numel())).all()):
            perm = None
        sorted_pos = [torch.sort(x).values for x in unions]
        hl = num_heads // degree
        spec = MaskSpec(mask=mask, seq_len=seq_len, heads=torch.arange(u * hl, (u + 1) * hl), num_heads=num_heads,
                        starts=starts)
        ring = Ring(peers=[peers[gg * degree + u] for gg in range(rings)], index=g, positions=sorted_pos,
                    spec=spec, k_tile=k_tile)
        replicate = degree // kv_heads if degree > kv_heads else 1
        return cls(ulysses_group=ulysses_group, degree=degree, replicate=replicate, ring=ring, perm=perm,
                   backend=backend, scale=scale, want_lse=want_lse)

    # -- layout changes ---------------------------------------------------------------------------
    def _gather(self, x: torch.Tensor, replicate: int = 1) -> torch.Tensor:
        """[B, n, Hx, D] sequence-split → [B, U·n, hl, D] head-split, sorted by global position."""
        if self.degree > 1:
            x = heads_to_seq(x, group=self.ulysses_group, degree=self.degree, replicate=replicate)
        if self.perm is not None:
            x = x.index_select(1, self.perm.to(x.device))
        return x

    def _scatter(self, x: torch.Tensor, replicate: int = 1) -> torch.Tensor:
        """Inverse of :meth:`_gather`."""
        if self.perm is not None:
            inv = torch.argsort(self.perm).to(x.device)
            x = x.index_select(1, inv)
        if self.degree > 1:
            x = seq_to_heads(x, group=self.ulysses_group, degree=self.degree, replicate=replicate)
        return x

    # -- passes -----------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """q ``[B, n, H, D]``, k/v ``[B, n, Hkv, D|E]`` → out ``[B, n, H, E]``, lse ``[B, H, n]`` (or empty), saved."""
        qh = self._gather(q)  # [B, U·n, H/U, D]
        kh = self._gather(k, self.replicate)  # [B, U·n, Hkv/U or 1, D]
        vh = self._gather(v, self.replicate)
        out, lse = ring_forward(self.ring, self.backend, qh, kh, vh, scale=self.scale)
        out_h = out.to(q.dtype)  # [B, U·n, H/U, E]
        out_local = self._scatter(out_h)  # [B, n, H, E]
        lse_local = torch.empty(0, dtype=lse.dtype, device=lse.device)
        if self.want_lse:
            l = self._scatter(lse.transpose(1, 2).unsqueeze(-1).contiguous())  # [B, n, H, 1]
            lse_local = l.squeeze(-1).transpose(1, 2).contiguous()  # [B, H, n]
        return out_local, lse_local, (qh, kh, vh, out_h, lse)

    def backward(self, dout: torch.Tensor, saved: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qh, kh, vh, out_h, lse = saved
        dh = self._gather(dout.contiguous())  # [B, U·n, H/U, E]
        dq, dk, dv = ring_backward(self.ring, self.backend, dh, qh, kh, vh, out_h, lse, scale=self.scale)
        dq = self._scatter(dq.to(qh.dtype))
        dk = self._scatter(dk.to(kh.dtype), self.replicate)
        dv = self._scatter(dv.to(vh.dtype), self.replicate)
        return dq, dk, dv
