"""Ring attention: K/V rotate around the ring with batched isend/irecv overlapped with local compute.

Members hold query and K/V tokens at known global positions. At step t member i holds the K/V of
source (i − t) mod R. Every member derives, from the positions and the mask alone (no
communication), which members need which source, so a source's K/V travels only as far round the
ring as the last member that needs it (:attr:`Ring.reach`): under causal contiguous layouts the
chunks of late ranks stop early. The backward pass sends the dK/dV accumulator of each source round
with its K/V; the member at the end of a source's route returns it to the owner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.distributed as dist

from ..comm import p2p
from .blocks import Job, MaskSpec, backward_jobs, forward_jobs, needs, plan

_TAG_KV, _TAG_DKV, _TAG_RET = 7101, 7102, 7103


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of partial results: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Ring:
    """One ring of context-parallel members and the block plans of this member.

    Attributes:
        peers: global ranks of the ring members, in ring order.
        index: this member's position in ``peers``.
        positions: sorted global positions of each member's local tokens.
        spec: mask, sequence length and the global indices of the local query heads.
    """

    peers: list[int]
    index: int
    positions: list[torch.Tensor]
    spec: MaskSpec
    k_tile: int | None = None
    jobs: list[list[Job]] = field(init=False)
    reach: list[int] = field(init=False)
    """reach[j]: how many steps source j's K/V travels (0: nobody else needs it)."""

    def __post_init__(self) -> None:
        r = len(self.peers)
        me = self.positions[self.index]
        self.jobs = [plan(self.spec, me, self.positions[j], k_tile=self.k_tile) for j in range(r)]
        self.reach = []
        for j in range(r):
            last = 0
            for t in range(1, r):
                i = (j + t) % r
                if i == self.index:
                    hit = bool(self.jobs[j])
                else:
                    hit = needs(self.spec, self.positions[i], self.positions[j], k_tile=self.k_tile)
                if hit:
                    last = t
            self.reach.append(last)

    @property
    def size(self) -> int:
        return len(self.peers)

    def source(self, step: int) -> int:
        return (self.index - step) % self.size

    def holds(self, step: int) -> bool:
        """Whether this member holds a K/V chunk at ``step``."""
        return step <= self.reach[self.source(step)]

    @property
    def next_peer(self) -> int:
        return self.peers[(self.index + 1) % self.size]

    @property
    def prev_peer(self) -> int:
        return self.peers[(self.index - 1) % self.size]


def _wait(works: list[dist.Work]) -> None:
    for w in works:
        w.wait()


def _rotate_kv(ring: Ring, t: int, kv: torch.Tensor | None, kv_shape: torch.Size, dtype: torch.dtype,
               device: torch.device) -> tuple[list[dist.Work], torch.Tensor | None]:
    """Post step ``t``'s K/V send (only while a later rank still needs this source) and the receive of
    step ``t+1``'s K/V; returns the pending works and the receive buffer (None if nothing arrives)."""
    if t + 1 >= ring.size:
        return [], None
    src = ring.source(t)
    sends = [(kv, ring.next_peer, _TAG_KV)] if kv is not None and t + 1 <= ring.reach[src] else []
    nxt, recvs = None, []
    if ring.holds(t + 1):
        nxt = torch.empty(kv_shape, dtype=dtype, device=device)  # [B, Sk, Hkv, D+E]
        recvs = [(nxt, ring.prev_peer, _TAG_KV)]
    return p2p(sends, recvs), nxt


def ring_forward(ring: Ring, backend: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over the ring.

    Args:
        q: ``[B, Sq, H, D]`` local queries; k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, E]`` local K/V.

    Returns:
        out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]``, both in the accumulation dtype (float32/64).
    """
    b, sq, h, _ = q.shape
    d = k.shape[-1]
    ad = acc_dtype(q.dtype)
    out = torch.zeros(b, sq, h, v.shape[-1], dtype=ad, device=q.device)  # [B, Sq, H, E]
    lse = torch.full((b, h, sq), float("-inf"), dtype=ad, device=q.device)  # [B, H, Sq]
    kv: torch.Tensor | None = torch.cat([k, v], dim=-1).contiguous()  # [B, Sk, Hkv, D+E]: one message per step
    kv_shape = kv.shape
    for t in range(ring.size):
        src = ring.source(t)
        works, nxt = _rotate_kv(ring, t, kv, kv_shape, k.dtype, k.device)
        if kv is not None:
            forward_jobs(ring.jobs[src], backend, q, kv[..., :d], kv[..., d:], out, lse, scale=scale)
        _wait(works)
        kv = nxt
    return out, lse


def ring_backward(ring: Ring, backend: ModuleType, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward over the ring: K/V go round again, each source's dK/dV accumulator travels with them.

    Args:
        dout: ``[B, Sq, H, E]``; out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]`` are the *global* results.

    Returns:
        dq ``[B, Sq, H, D]``, dk ``[B, Sk, Hkv, D]``, dv ``[B, Sk, Hkv, E]`` in the accumulation dtype.
    """
    d = k.shape[-1]
    ad = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=ad, device=q.device)
    kv: torch.Tensor | None = torch.cat([k, v], dim=-1).contiguous()  # [B, Sk, Hkv, D+E]
    kv_shape = kv.shape
    dkv_in: torch.Tensor | None = None  # accumulator received for the source held at this step
    dkv_works: list[dist.Work] = []  # last step's accumulator send/receive
    returns: list[tuple[torch.Tensor, int]] = []  # (accumulator, owner) at the end of a route
    own_final: torch.Tensor | None = None
    for t in range(ring.size):
        src = ring.source(t)
        kv_works, nxt = _rotate_kv(ring, t, kv, kv_shape, k.dtype, k.device)
        acc = None
        if kv is not None:
            acc = torch.zeros(kv_shape, dtype=ad, device=k.device)  # [B, Sk, Hkv, D+E]
            backward_jobs(ring.jobs[src], backend, dout, q, kv[..., :d], kv[..., d:], out, lse, dq,
                          acc[..., :d], acc[..., d:], scale=scale)
        # the accumulator for this step's source arrives from the previous member (sent last step)
        _wait(dkv_works)
        dkv_sends = []
        if acc is not None:
            if dkv_in is not None:
                acc += dkv_in
            if t < ring.reach[src]:
                dkv_sends = [(acc, ring.next_peer, _TAG_DKV)]
            elif t == 0:
                own_final = acc
            else:
                returns.append((acc, ring.peers[src]))
        dkv_in = None
        dkv_recvs = []
        if t + 1 < ring.size and ring.holds(t + 1):
            dkv_in = torch.empty(kv_shape, dtype=ad, device=k.device)
            dkv_recvs = [(dkv_in, ring.prev_peer, _TAG_DKV)]
        dkv_works = p2p(dkv_sends, dkv_recvs)
        _wait(kv_works)
        kv = nxt
    _wait(dkv_works)
    # end-of-route accumulators go home
    ret_in = None
    recvs = []
    if ring.reach[ring.index] > 0:
        ret_in = torch.empty(kv_shape, dtype=ad, device=k.device)
        end = (ring.index + ring.reach[ring.index]) % ring.size
        recvs = [(ret_in, ring.peers[end], _TAG_RET)]
    _wait(p2p([(acc, owner, _TAG_RET) for acc, owner in returns], recvs))
    dkv = ret_in if ret_in is not None else own_final
    return dq, dkv[..., :d], dkv[..., d:]
