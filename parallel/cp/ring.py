"""Ring attention: K/V rotate around the ring with batched isend/irecv overlapped with local compute.

Members hold query and K/V tokens at known global positions. At step t member i holds the K/V of
source (i − t) mod R. Every member derives, from the positions and the mask alone (no
communication), which members need which source, so a source's K/V travels only as far round the
ring as the last member that needs it (:attr:`Ring.reach`): under causal contiguous layouts the
chunks of late ranks stop early. The backward pass sends the dK/dV accumulator of each source round
with its K/V; the member at the end of a source's route returns it to the owner.

Point-to-point order. NCCL matches sends and receives between two ranks by posting order alone (it
ignores tags), so every message here uses the one tag :data:`TAG` and the code keeps one invariant:
whenever member i posts a send to member j, j posts the matching receive from i at the same point of
its own sequence. Per step the order is K/V, then (backward) the dK/dV accumulator, then after the
loop the end-of-route returns; every condition deciding whether a message exists is computed from
``reach``, which all members derive identically (:func:`longreach.parallel.cp.blocks.needs` for every
member, never a member's own plan). The gloo tests run with that single tag, so a mismatch shows up
as a wrong result or a size error there, not only on GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.distributed as dist

from ..comm import p2p
from .blocks import (Job, MaskSpec, backward_jobs, forward_buffers, forward_jobs, heads_first, heads_major, needs,
                     pack_kv, packed_shape, partial_grad_dtype, plan, prefill_out, schedule, unpack_kv)

#: The one tag of every ring message (matching is by order, as under NCCL).
TAG = 0


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
    jobs: list[list[Job]] = field(init=False)
    reach: list[int] = field(init=False)
    """reach[j]: how many steps source j's K/V travels (0: nobody else needs it)."""
    q_prefill: list[slice] = field(init=False)
    """Local query rows no kernel call initialises (out 0 / lse −inf / dq 0 first)."""
    k_prefill: list[list[slice]] = field(init=False)
    """k_prefill[j]: key rows of source j that get no first-write call (dK/dV 0 first)."""

    def __post_init__(self) -> None:
        r = len(self.peers)
        me = self.positions[self.index]
        self.jobs = [plan(self.spec, me, self.positions[j]) for j in range(r)]
        self.reach = []
        for j in range(r):
            last = 0
            for t in range(1, r):
                if needs(self.spec, self.positions[(j + t) % r], self.positions[j]):
                    last = t
            self.reach.append(last)
        order = [self.source(t) for t in range(r) if self.holds(t)]
        n_k = self.positions[self.index].numel()
        q_pre, k_pre = schedule([self.jobs[j] for j in order], me.numel(), n_k)
        self.q_prefill = q_pre
        self.k_prefill = [[slice(0, n_k)] for _ in range(r)]
        for j, pre in zip(order, k_pre):
            self.k_prefill[j] = pre

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


def _buffer(free: list[torch.Tensor], shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer from ``free`` (reused across steps) or a new one."""
    return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)


def _rotate_kv(ring: Ring, t: int, kv: torch.Tensor | None, free: list[torch.Tensor], like: torch.Tensor
               ) -> tuple[list[dist.Work], torch.Tensor | None]:
    """Post step ``t``'s K/V send (only while a later member still needs this source) and the receive
    of step ``t+1``'s K/V; returns the pending works and the receive buffer (None if nothing arrives).

    Send and receive conditions are the same expression of ``reach`` seen from both ends (the member
    after this one holds source(t) at step t+1), which keeps the order invariant of the module."""
    if t + 1 >= ring.size:
        return [], None
    src = ring.source(t)
    sends = [(kv, ring.next_peer, TAG)] if kv is not None and t + 1 <= ring.reach[src] else []
    nxt, recvs = None, []
    if ring.holds(t + 1):
        nxt = _buffer(free, like.shape, like.dtype, like.device)  # like pack_kv's buffer
        recvs = [(nxt, ring.prev_peer, TAG)]
    return p2p(sends, recvs), nxt


def _single_call(ring: Ring, sq: int) -> Job | None:
    """The one job of a one-member ring when it covers every query row (Ulysses, causal or full): then
    the kernel's results are the results, with no buffers, copies or merges around them."""
    if ring.size != 1 or len(ring.jobs[0]) != 1:
        return None
    job = ring.jobs[0][0]
    return job if job.q == slice(0, sq) and job.k == [slice(0, job.sk)] else None


def ring_forward(ring: Ring, backend: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over the ring.

    Args:
        q: ``[B, Sq, H, D]`` local queries; k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, E]`` local K/V.

    Returns:
        out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]``, both in the accumulation dtype (float32/64); out is
        stored heads-first when the backend reads that layout best (:func:`~.blocks.heads_first`).
    """
    sq = q.shape[1]
    d = k.shape[-1]
    ad = acc_dtype(q.dtype)
    job = _single_call(ring, sq)
    if job is not None:
        out, lse = backend.forward(q, k, v, mask=job.placed, scale=scale)
        return out.to(ad), lse.to(ad)
    heads = heads_first(backend)
    q, out, lse = forward_buffers(q, v.shape[-1], ad, heads=heads)  # out [B, Sq, H, E], lse [B, H, Sq]
    prefill_out(out, lse, ring.q_prefill)
    kv: torch.Tensor | None = pack_kv(k, v, heads=heads)  # one message per step
    like = kv
    free: list[torch.Tensor] = []
    for t in range(ring.size):
        src = ring.source(t)
        works, nxt = _rotate_kv(ring, t, kv, free, like)
        if kv is not None:
            forward_jobs(ring.jobs[src], backend, q, *unpack_kv(kv, d, heads=heads), out, lse, scale=scale)
        _wait(works)
        if kv is not None:
            free.append(kv)  # sent and used: receives the K/V of a later step
        kv = nxt
    return out, lse


def ring_backward(ring: Ring, backend: ModuleType, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *, scale: float, kv_summed: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward over the ring: K/V go round again, each source's dK/dV accumulator travels with them.

    Partial gradients are summed in float32 accumulators and rounded once by the caller; each step's
    contribution is rounded to the input dtype at most once before the sum (not at all when the mask
    splits the step into several calls: :func:`~.blocks.partial_grad_dtype`).

    Args:
        dout: ``[B, Sq, H, E]``; out ``[B, Sq, H, E]`` and lse ``[B, H, Sq]`` are the *global* results.
        kv_summed: the caller sums the returned dK/dV with others (replicated K/V heads), so they are
            partial even when one kernel call computes them all.

    Returns:
        dq ``[B, Sq, H, D]``, dk ``[B, Sk, Hkv, D]``, dv ``[B, Sk, Hkv, E]`` in the accumulation dtype
        (in the input dtype when one kernel call computes them all and ``kv_summed`` is False).
    """
    d = k.shape[-1]
    ad = acc_dtype(q.dtype)
    job = _single_call(ring, q.shape[1])
    if job is not None:
        grad_dtype = partial_grad_dtype(backend, q) if kv_summed else None
        extra = {} if grad_dtype is None else {"grad_dtype": grad_dtype}
        return backend.backward(dout, q, k, v, out, lse, mask=job.placed, scale=scale, **extra)
    dq = torch.empty(q.shape, dtype=ad, device=q.device)
    for s in ring.q_prefill:
        dq[:, s].zero_()
    heads = heads_first(backend)
    if heads:
        q = heads_major(q)
    kv: torch.Tensor | None = pack_kv(k, v, heads=heads)
    # dK/dV accumulators are token-major (the layout kernels write gradients in) whatever K/V's layout
    kv_shape, like = packed_shape(k, v), kv
    kv_free: list[torch.Tensor] = []
    acc_free: list[torch.Tensor] = []  # float32 accumulators no message holds any more
    dkv_in: torch.Tensor | None = None  # accumulator received for the source held at this step
    dkv_works: list[dist.Work] = []  # last step's accumulator send/receive
    in_flight: torch.Tensor | None = None  # last step's sent accumulator
    returns: list[tuple[torch.Tensor, int]] = []  # (accumulator, owner) at the end of a route
    own_final: torch.Tensor | None = None
    for t in range(ring.size):
        src = ring.source(t)
        kv_works, nxt = _rotate_kv(ring, t, kv, kv_free, like)
        acc = None
        if kv is not None:
            acc = _buffer(acc_free, kv_shape, ad, k.device)  # dK/dV, token-major pack_kv layout
            for s in ring.k_prefill[src]:
                for part in unpack_kv(acc, d):
                    part[:, s].zero_()
            backward_jobs(ring.jobs[src], backend, dout, q, *unpack_kv(kv, d, heads=heads), out, lse, dq,
                          *unpack_kv(acc, d), scale=scale,
                          grad_dtype=partial_grad_dtype(backend, q, ring.jobs[src]))
        # the accumulator for this step's source arrives from the previous member (sent last step)
        _wait(dkv_works)
        if in_flight is not None:
            acc_free.append(in_flight)
            in_flight = None
        dkv_sends = []
        if acc is not None:
            if dkv_in is not None:
                acc += dkv_in
                acc_free.append(dkv_in)
            if t < ring.reach[src]:
                dkv_sends = [(acc, ring.next_peer, TAG)]
                in_flight = acc
            elif t == 0:
                own_final = acc
            else:
                returns.append((acc, ring.peers[src]))
        dkv_in = None
        dkv_recvs = []
        if t + 1 < ring.size and ring.holds(t + 1):
            dkv_in = _buffer(acc_free, kv_shape, ad, k.device)
            dkv_recvs = [(dkv_in, ring.prev_peer, TAG)]
        dkv_works = p2p(dkv_sends, dkv_recvs)
        _wait(kv_works)
        if kv is not None:
            kv_free.append(kv)
        kv = nxt
    _wait(dkv_works)
    # end-of-route accumulators go home (each owner receives exactly one, after every ring message)
    ret_in = None
    recvs = []
    if ring.reach[ring.index] > 0:
        ret_in = torch.empty(kv_shape, dtype=ad, device=k.device)
        end = (ring.index + ring.reach[ring.index]) % ring.size
        recvs = [(ret_in, ring.peers[end], TAG)]
    _wait(p2p([(acc, owner, TAG) for acc, owner in returns], recvs))
    dkv = ret_in if ret_in is not None else own_final
    return (dq, *unpack_kv(dkv, d))
