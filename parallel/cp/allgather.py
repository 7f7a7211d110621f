"""All-gather K/V context parallelism (llama3 style), on any layout and any mask.

Forward: start the K/V all-gather, compute the local diagonal block while it is in flight, then the
key sources the mask leaves non-empty for the local queries (global positions; empty sources and
empty key tiles are skipped, which is what cuts K to the documents overlapping the local queries).
Backward: gather K/V again (nothing P-times larger is kept between the passes), compute every
block's dK/dV into a full-sequence buffer and reduce-scatter it to the owners.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

from ..comm import all_gather_into, reduce_scatter_into
from .blocks import (Job, MaskSpec, backward_jobs, forward_buffers, forward_jobs, heads_first, heads_major, pack_kv,
                     packed_shape, partial_grad_dtype, plan, prefill_out, schedule, tile_size, token_major,
                     unpack_kv)
from .ring import acc_dtype


@dataclass
class AllGatherPlan:
    """Block plans of one rank for every call with the same shapes, layout and mask (cached)."""

    rank: int
    size: int
    jobs: list[list[Job]]
    """jobs[j]: kernel calls of the local queries against rank j's keys."""
    q_prefill: list[slice]
    """Local query rows no call initialises."""
    k_prefill: list[list[slice]]
    """k_prefill[j]: rows of rank j's dK/dV block no first-write call covers."""

    @classmethod
    def build(cls, *, rank: int, positions: list[torch.Tensor], seq_len: int, num_heads: int, mask,
              starts: torch.Tensor | None = None) -> "AllGatherPlan":
        spec = MaskSpec(mask=mask, seq_len=seq_len, heads=torch.arange(num_heads), num_heads=num_heads,
                        starts=starts, tile=tile_size(positions[rank].numel()))
        size = len(positions)
        jobs = [plan(spec, positions[rank], positions[j]) for j in range(size)]
        order = _order(rank, size)
        q_pre, k_pre = schedule([jobs[j] for j in order], positions[rank].numel(), positions[rank].numel())
        k_prefill: list[list[slice]] = [[] for _ in range(size)]
        for j, pre in zip(order, k_pre):
            k_prefill[j] = pre
        return cls(rank=rank, size=size, jobs=jobs, q_prefill=q_pre, k_prefill=k_prefill)


def _order(rank: int, size: int) -> list[int]:
    # local source first: it needs no communication, so it overlaps the gather
    return [rank] + [j for j in range(size) if j != rank]


@dataclass
class AllGatherEngine:
    group: dist.ProcessGroup | None
    plan: AllGatherPlan
    backend: ModuleType
    scale: float

    @property
    def rank(self) -> int:
        return self.plan.rank

    @property
    def size(self) -> int:
        return self.plan.size

    @property
    def jobs(self) -> list[list[Job]]:
        return self.plan.jobs

    def _gather(self, kv: torch.Tensor) -> tuple[torch.Tensor, dist.Work | None]:
        if self.size == 1:
            return kv.unsqueeze(0), None
        buf = torch.empty((self.size * kv.shape[0],) + tuple(kv.shape[1:]), dtype=kv.dtype, device=kv.device)
        work = all_gather_into(buf, kv, group=self.group, async_op=True)
        return buf.view((self.size,) + tuple(kv.shape)), work  # [P, *pack_kv's shape]

    def _order(self) -> list[int]:
        return _order(self.rank, self.size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        d = k.shape[-1]
        ad = acc_dtype(q.dtype)
        heads = heads_first(self.backend)
        kv = pack_kv(k, v, heads=heads).contiguous()  # one all-gather for K and V
        full, work = self._gather(kv)
        qk, out, lse = forward_buffers(q, v.shape[-1], ad, heads=heads)  # out [B, n, H, E], lse [B, H, n]
        prefill_out(out, lse, self.plan.q_prefill)
        for j in self._order():
            if j != self.rank and work is not None:
                work.wait()
                work = None
            src = kv if j == self.rank else full[j]
            forward_jobs(self.jobs[j], self.backend, qk, *unpack_kv(src, d, heads=heads), out, lse, scale=self.scale)
        if work is not None:
            work.wait()
        out_q = token_major(out, q.dtype)
        return out_q, lse, (q, k, v, out_q, lse)

    def backward(self, dout: torch.Tensor, saved: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = saved
        d = k.shape[-1]
        ad = acc_dtype(q.dtype)
        heads = heads_first(self.backend)
        kv = pack_kv(k, v, heads=heads).contiguous()  # one all-gather for K and V
        full, work = self._gather(kv)
        dq = torch.empty(q.shape, dtype=ad, device=q.device)
        for s in self.plan.q_prefill:
            dq[:, s].zero_()
        qk = heads_major(q) if heads else q
        shape = packed_shape(k, v)  # dK/dV token-major (the kernels' gradient layout)
        dkv = torch.empty((self.size,) + shape, dtype=ad, device=q.device)  # [P, *shape]
        for j in range(self.size):
            for s in self.plan.k_prefill[j]:
                for part in unpack_kv(dkv[j], d):
                    part[:, s].zero_()
        for j in self._order():
            if j != self.rank and work is not None:
                work.wait()
                work = None
            src = kv if j == self.rank else full[j]
            backward_jobs(self.jobs[j], self.backend, dout, qk, *unpack_kv(src, d, heads=heads), out, lse, dq,
                          *unpack_kv(dkv[j], d), scale=self.scale,
                          grad_dtype=partial_grad_dtype(self.backend, q, self.jobs[j]))
        if work is not None:
            work.wait()
        if self.size > 1:
            local = torch.empty(shape, dtype=ad, device=q.device)
            reduce_scatter_into(local, dkv.view((self.size * shape[0],) + shape[1:]), group=self.group)
        else:
            local = dkv[0]
        dk, dv = unpack_kv(local, d)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
