"""Block plans: which (local query segment, key segment) pairs a mask leaves non-empty, and the
local kernel calls that compute them (forward merged with the one LSE merge; backward with the
*global* out / lse).

Positions are global, so the causal structure of a zigzag or stripe block comes from the mask, not
from special cases: a plan splits the local queries and a source's keys into runs of consecutive
positions, classifies each pair (EMPTY / PARTIAL / FULL), skips EMPTY pairs, calls the kernel
without a mask for FULL pairs and with the placed mask for PARTIAL ones. Under zigzag this *is* the
balanced schedule of METHODS.md (a remote step costs half a block pair; the diagonal step is one
aligned causal block plus one full block); under stripe every remote step is one block with the
diagonal included or excluded by the mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from longreach.kernels import masks as M
from longreach.kernels.masks import EMPTY, FULL, Mask, PlacedMask
from longreach.kernels.merge import merge_attention

from ..comm import record_work, work_wanted

# Positions broken into more runs than this, or into runs shorter than _MIN_RUN on average
# (stripe-like), are treated as one segment: classifying each piece would cost more than it saves.
_MAX_RUNS = 64
_MIN_RUN = 4


def runs(pos: torch.Tensor, tile: int | None = None, starts: torch.Tensor | None = None) -> list[slice]:
    """Runs of consecutive positions in sorted ``pos``, optionally cut into ``tile``-token pieces.

    ``starts`` (bool ``[seq_len]``) marks the global positions where a layout chunk begins; runs are
    cut there too, so two adjacent zigzag chunks on one rank stay separate blocks (the diagonal
    block of each is then causal on its own and the other pair is FULL or EMPTY).
    """
    n = pos.numel()
    if n == 0:
        return []
    cut = (pos[1:] - pos[:-1]) != 1
    if starts is not None:
        cut = cut | starts[pos[1:]]
    breaks = cut.nonzero().flatten() + 1
    nruns = breaks.numel() + 1
    if nruns > _MAX_RUNS or n < _MIN_RUN * nruns:
        bounds = [0, n]
    else:
        bounds = [0, *breaks.tolist(), n]
    out: list[slice] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        step = (b - a) if not tile else tile
        for s in range(a, b, step):
            out.append(slice(s, min(b, s + step)))
    return out


def _merge_slices(parts: list[slice]) -> list[slice]:
    out: list[slice] = []
    for s in parts:
        if out and out[-1].stop == s.start:
            out[-1] = slice(out[-1].start, s.stop)
        else:
            out.append(s)
    return out


def take(x: torch.Tensor, parts: list[slice], dim: int = 1) -> torch.Tensor:
    """``x`` restricted to the index slices ``parts`` along ``dim`` (a view when there is one slice)."""
    if len(parts) == 1:
        s = parts[0]
        return x.narrow(dim, s.start, s.stop - s.start)
    return torch.cat([x.narrow(dim, s.start, s.stop - s.start) for s in parts], dim=dim)


def _index(parts: list[slice]) -> torch.Tensor:
    return torch.cat([torch.arange(s.start, s.stop) for s in parts])


@dataclass
class Job:
    """One local kernel call: queries ``q`` (a slice) against keys ``k`` (slices), masked by ``placed``."""

    q: slice
    k: list[slice]
    placed: PlacedMask | None
    """None: every pair allowed (call the kernel without a mask)."""
    sq: int
    sk: int


@dataclass
class MaskSpec:
    """What a plan needs to know about the mask and the heads of the local queries."""

    mask: Mask
    seq_len: int
    heads: torch.Tensor
    """Global indices of the local query heads."""
    num_heads: int
    """Global query head count."""
    starts: torch.Tensor | None = None
    """bool ``[seq_len]``: True where a layout chunk begins (see :func:`runs`)."""

    def classify(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> int:
        """EMPTY if no head allows any pair, FULL if every head allows every pair, else PARTIAL."""
        c = self.mask.classify(q_pos, k_pos, heads=self.heads, num_heads=self.num_heads, seq_len=self.seq_len)
        if int(c.max()) == EMPTY:
            return EMPTY
        return FULL if int(c.min()) == FULL else 1

    def place(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> PlacedMask:
        return self.mask.place(q_pos, k_pos, seq_len=self.seq_len, heads=self.heads, num_heads=self.num_heads)


def plan(spec: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, *, k_tile: int | None = None) -> list[Job]:
    """Kernel calls computing local queries (``q_pos``) against one key source (``k_pos``).

    Per query run: the FULL key segments in one unmasked call, the PARTIAL ones in one masked call,
    EMPTY ones skipped.
    """
    jobs: list[Job] = []
    n = q_pos.numel()
    if (type(spec.mask) is type(M.causal()) and n == spec.seq_len and k_pos.numel() == n
            and bool((q_pos == torch.arange(n)).all()) and bool((k_pos == q_pos).all())):
        # the whole sequence against itself (Ulysses): one aligned causal call beats chunked blocks
        return [Job(q=slice(0, n), k=[slice(0, n)], placed=spec.place(q_pos, k_pos), sq=n, sk=n)]
    k_runs = runs(k_pos, k_tile, spec.starts)
    for qs in runs(q_pos, None, spec.starts):
        qp = q_pos[qs]
        full, partial = [], []
        for ks in k_runs:
            c = spec.classify(qp, k_pos[ks])
            if c == FULL:
                full.append(ks)
            elif c != EMPTY:
                partial.append(ks)
        for parts, masked in ((full, False), (partial, True)):
            if not parts:
                continue
            parts = _merge_slices(parts)
            sk = sum(s.stop - s.start for s in parts)
            placed = spec.place(qp, k_pos[_index(parts)]) if masked else None
            jobs.append(Job(q=qs, k=parts, placed=placed, sq=qs.stop - qs.start, sk=sk))
    return jobs


def needs(spec: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, *, k_tile: int | None = None) -> bool:
    """Whether any local query may attend any key of the source (so its K/V must reach this rank)."""
    for qs in runs(q_pos, None, spec.starts):
        for ks in runs(k_pos, k_tile, spec.starts):
            if spec.classify(q_pos[qs], k_pos[ks]) != EMPTY:
                return True
    return False


def _count(phase: str, job: Job, batch: int, heads: int) -> None:
    active, exact = work_wanted()
    if not active:
        return
    computed = batch * job.sq * job.sk * heads
    allowed = None
    if exact:
        if job.placed is None:
            allowed = computed
        else:
            d = job.placed.dense(heads)  # [Hm, Sq, Sk]
            allowed = batch * int(d.sum()) * (heads // d.shape[0])
    record_work(phase, computed, allowed)


def forward_jobs(jobs: list[Job], backend: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, *, scale: float) -> None:
    """Run ``jobs`` and merge each result into the running ``out`` ``[B, Sq, H, E]`` / ``lse`` ``[B, H, Sq]`` in place."""
    for job in jobs:
        qs = q[:, job.q]  # [B, sq, H, D]
        ks, vs = take(k, job.k), take(v, job.k)  # [B, sk, Hkv, D|E]
        o, l = backend.forward(qs, ks, vs, mask=job.placed, scale=scale)
        o, l = merge_attention(out[:, job.q], lse[:, :, job.q], o, l)
        out[:, job.q] = o
        lse[:, :, job.q] = l
        _count("fwd", job, q.shape[0], q.shape[2])


def backward_jobs(jobs: list[Job], backend: ModuleType, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                  dv: torch.Tensor, *, scale: float) -> None:
    """Accumulate each job's gradients (from the global ``out``/``lse``) into ``dq``/``dk``/``dv`` in place."""
    for job in jobs:
        ks, vs = take(k, job.k), take(v, job.k)
        gq, gk, gv = backend.backward(dout[:, job.q], q[:, job.q], ks, vs, out[:, job.q], lse[:, :, job.q],
                                      mask=job.placed, scale=scale)
        dq[:, job.q] += gq
        off = 0
        for s in job.k:
            n = s.stop - s.start
            dk[:, s] += gk[:, off:off + n]
            dv[:, s] += gv[:, off:off + n]
            off += n
        _count("bwd", job, q.shape[0], q.shape[2])
