"""Block plans: the fewest local kernel calls that compute local queries against one key source,
and the in-place execution of those calls (forward merged with one LSE merge; backward with the
*global* out / lse).

Positions are global, so the causal structure of a zigzag or stripe block comes from the mask, not
from special cases. :func:`plan` works from coarse to fine and stops at the first level that
describes the block exactly:

1. the whole block: EMPTY (no call), FULL (one call without a mask), or *causal-aligned* — the mask
   equals ``key index ≤ query index`` on local indices, possibly after dropping the first query and
   the last key — which is one aligned causal call (the zigzag diagonal step, every stripe step);
2. runs of consecutive positions cut at layout chunks: consecutive query runs that see the same FULL
   key runs share one unmasked call (a zigzag remote step is one call), PARTIAL run pairs go to 3.;
3. tiles of at most ``tile`` tokens inside a PARTIAL run pair: FULL tiles of a query tile in one
   call, PARTIAL tile pairs one call each, causal-aligned where they can be (a document's diagonal
   tile), else with the placed mask of that one tile pair.

So no call carries an explicit mask larger than one tile pair, whatever the mask (the scale
contract of framework/ARCHITECTURE.md), and a plan is O(S/P) in memory apart from the (S/P/tile)²
tile classes of one run pair. :func:`schedule` then marks, for a fixed order of sources,
which calls *initialise* their output rows (a copy, not a merge into zeros) and which merges need the
−inf guard.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import torch

from longreach.kernels import masks as M
from longreach.kernels.dense import heads_major
from longreach.kernels.masks import EMPTY, FULL, PARTIAL, Mask, PlacedMask

from ..comm import record_work, work_wanted

# Positions broken into more runs than this, or into runs shorter than _MIN_RUN on average
# (stripe-like), are treated as one segment: classifying each piece would cost more than it saves.
_MAX_RUNS = 64
_MIN_RUN = 4
#: Largest tile (tokens) of a PARTIAL pair: bounds every explicit mask a kernel call receives.
MAX_TILE = 128

_CAUSAL = M.causal()


def tile_size(n: int) -> int:
    """Tile used for ``n`` local queries: 16 ≤ tile ≤ :data:`MAX_TILE`, about n/8."""
    return min(MAX_TILE, max(16, n // 8))


def runs(pos: torch.Tensor, tile: int | None = None, starts: torch.Tensor | None = None) -> list[slice]:
    """Runs of consecutive positions in sorted ``pos``, optionally cut into ``tile``-token pieces.

    ``starts`` (bool ``[seq_len]``) marks the global positions where a layout chunk begins; runs are
    cut there too, so two adjacent zigzag chunks on one rank stay separate runs.
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


def _true_slices(flags: torch.Tensor) -> list[slice]:
    """Slices of the True runs of a bool vector."""
    if not bool(flags.any()):
        return []
    f = flags.to(torch.int8)
    edges = torch.diff(f, prepend=f.new_zeros(1), append=f.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return [slice(a, b) for a, b in zip(starts, stops)]


def take(x: torch.Tensor, parts: list[slice], dim: int = 1) -> torch.Tensor:
    """``x`` restricted to the index slices ``parts`` along ``dim`` (a view when there is one slice)."""
    if len(parts) == 1:
        s = parts[0]
        return x.narrow(dim, s.start, s.stop - s.start)
    return torch.cat([x.narrow(dim, s.start, s.stop - s.start) for s in parts], dim=dim)


@lru_cache(maxsize=64)
def _aligned_causal(n: int) -> PlacedMask:
    """Causal over local indices 0..n-1 (what the CPU flash kernel runs as one ``is_causal`` call)."""
    pos = torch.arange(n)
    return _CAUSAL.place(pos, pos, seq_len=n)


@dataclass
class Job:
    """One local kernel call: queries ``q`` (a slice) against keys ``k`` (slices), masked by ``placed``."""

    q: slice
    k: list[slice]
    placed: PlacedMask | None
    """None: every pair allowed (call the kernel without a mask)."""
    sq: int
    sk: int
    kind: str = "full"
    """``full`` (no mask), ``causal`` (aligned causal on local indices) or ``masked`` (one tile pair)."""
    init: bool = False
    """Set by :func:`schedule`: these output rows are written here first (copy, no merge)."""
    guard: bool = False
    """Set by :func:`schedule`: a row may be empty (lse −inf) on both sides of the merge."""
    k_init: bool = False
    """Set by :func:`schedule`: these key rows get their first dK/dV contribution of the source here."""


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
    tile: int = MAX_TILE
    """Tile of PARTIAL pairs and of every classification (:func:`tile_size` of the local query count)."""

    def classify(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> int:
        """EMPTY if no head allows any pair, FULL if every head allows every pair, else PARTIAL.

        Decided from tile classes, so a mask without an analytic answer for the whole block (``&``,
        ``|`` of partial masks) evaluates its pattern one tile row at a time, never over the block."""
        if q_pos.numel() == 0 or k_pos.numel() == 0:
            return EMPTY
        cls = self.tiles(q_pos, k_pos, self.tile)  # [nQ, nK]
        if bool((cls == EMPTY).all()):
            return EMPTY
        return FULL if bool((cls == FULL).all()) else PARTIAL

    def tiles(self, q_pos: torch.Tensor, k_pos: torch.Tensor, tile: int) -> torch.Tensor:
        """Tile classes over every head, int8 ``[nQ, nK]`` (EMPTY / FULL only when all heads agree)."""
        bm = self.mask.block_map(q_pos, k_pos, block_q=tile, block_k=tile, heads=self.heads,
                                 num_heads=self.num_heads, seq_len=self.seq_len)  # [Hm, nQ, nK]
        lo, hi = bm.min(dim=0).values, bm.max(dim=0).values
        out = torch.full_like(lo, PARTIAL)
        out[hi == EMPTY] = EMPTY
        out[lo == FULL] = FULL
        return out

    def dense(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return self.mask.dense(q_pos, k_pos, heads=self.heads, num_heads=self.num_heads, seq_len=self.seq_len)

    def place(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> PlacedMask:
        return self.mask.place(q_pos, k_pos, seq_len=self.seq_len, heads=self.heads, num_heads=self.num_heads)


def _aligned(qp: torch.Tensor, kp: torch.Tensor) -> bool:
    """Sorted positions with ``kp[j] ≤ qp[i] ⇔ j ≤ i``: global causal is local aligned causal."""
    if qp.numel() != kp.numel() or qp.numel() == 0:
        return False
    return bool((kp <= qp).all()) and bool((kp[1:] > qp[:-1]).all())


def _equals_causal(spec: MaskSpec, qp: torch.Tensor, kp: torch.Tensor) -> bool:
    """Whether the mask allows exactly the causal pairs of ``qp`` × ``kp`` (every head), decided tile by
    tile (analytic classes first, the elementwise pattern of one tile pair at a time)."""
    if type(spec.mask) is type(_CAUSAL):
        return True
    if not spec.mask.is_causal:
        return False
    t = tile_size(qp.numel())
    bm = spec.mask.block_map(qp, kp, block_q=t, block_k=t, heads=spec.heads, num_heads=spec.num_heads,
                             seq_len=spec.seq_len)  # [Hm, nQ, nK]
    bc = _CAUSAL.block_map(qp, kp, block_q=t, block_k=t)  # [1, nQ, nK]
    definite = (bm != PARTIAL) & (bc != PARTIAL)
    if bool((definite & (bm != bc)).any()):
        return False
    for i, j in ((bm == PARTIAL) | (bc == PARTIAL)).any(dim=0).nonzero().tolist():
        qt, kt = qp[i * t:(i + 1) * t], kp[j * t:(j + 1) * t]
        if not bool((spec.dense(qt, kt) == (kt[None, :] <= qt[:, None])[None]).all()):  # [Hm, t, t]
            return False
    return True


def _causal_job(spec: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, qs: slice, ks: slice) -> Job | None:
    """One aligned causal call for the pair ``qs`` × ``ks`` if the mask allows exactly that (dropping
    the first query and last key when they see nothing, as a later stripe step needs), else None."""
    qp, kp = q_pos[qs], k_pos[ks]
    n = qp.numel()
    if n != kp.numel():
        return None
    for o in (0, 1):
        if o >= n or not _aligned(qp[o:], kp[:n - o]):
            continue
        if o and (spec.classify(qp[:o], kp) != EMPTY or spec.classify(qp, kp[n - o:]) != EMPTY):
            continue
        if not _equals_causal(spec, qp[o:], kp[:n - o]):
            continue
        m = n - o
        return Job(q=slice(qs.start + o, qs.stop), k=[slice(ks.start, ks.stop - o)], placed=_aligned_causal(m),
                   sq=m, sk=m, kind="causal")
    return None


def _full_jobs(rows: list[tuple[slice, list[slice]]]) -> list[Job]:
    """Unmasked calls for (query slice, FULL key slices) rows: consecutive query slices that see the
    same keys share one call."""
    groups: list[tuple[slice, list[slice]]] = []
    for qs, ks in rows:
        ks = _merge_slices(ks)
        if not ks:
            continue
        if groups and groups[-1][1] == ks and groups[-1][0].stop == qs.start:
            groups[-1] = (slice(groups[-1][0].start, qs.stop), ks)
        else:
            groups.append((qs, ks))
    return [Job(q=qs, k=ks, placed=None, sq=qs.stop - qs.start, sk=sum(s.stop - s.start for s in ks))
            for qs, ks in groups]


def _partial_jobs(spec: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, qs: slice, ks: slice,
                  tile: int) -> list[Job]:
    job = _causal_job(spec, q_pos, k_pos, qs, ks)
    if job is not None:
        return [job]
    cls = spec.tiles(q_pos[qs], k_pos[ks], tile)  # [nQ, nK]
    rows: list[tuple[slice, list[slice]]] = []
    masked: list[Job] = []
    for i in range(cls.shape[0]):
        qt = slice(qs.start + i * tile, min(qs.stop, qs.start + (i + 1) * tile))
        full = []
        for j in (cls[i] != EMPTY).nonzero().flatten().tolist():
            kt = slice(ks.start + j * tile, min(ks.stop, ks.start + (j + 1) * tile))
            if int(cls[i, j]) == FULL:
                full.append(kt)
                continue
            job = _causal_job(spec, q_pos, k_pos, qt, kt)
            if job is None:
                job = Job(q=qt, k=[kt], placed=spec.place(q_pos[qt], k_pos[kt]), sq=qt.stop - qt.start,
                          sk=kt.stop - kt.start, kind="masked")
            masked.append(job)
        rows.append((qt, full))
    return _full_jobs(rows) + masked


def plan(spec: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, *, tile: int | None = None) -> list[Job]:
    """Kernel calls computing local queries (``q_pos``, sorted) against one key source (``k_pos``).

    Returns the calls in execution order (see the module docstring for how they are chosen);
    ``init``/``guard``/``k_init`` are left for :func:`schedule`.
    """
    sq, sk = q_pos.numel(), k_pos.numel()
    if sq == 0 or sk == 0:
        return []
    tile = tile or spec.tile
    whole = spec.classify(q_pos, k_pos)
    if whole == EMPTY:
        return []
    if whole == FULL:
        return [Job(q=slice(0, sq), k=[slice(0, sk)], placed=None, sq=sq, sk=sk)]
    job = _causal_job(spec, q_pos, k_pos, slice(0, sq), slice(0, sk))
    if job is not None:
        return [job]
    q_runs, k_runs = runs(q_pos, None, spec.starts), runs(k_pos, None, spec.starts)
    rows: list[tuple[slice, list[slice]]] = []
    partial: list[Job] = []
    for qs in q_runs:
        full = []
        for ks in k_runs:
            c = spec.classify(q_pos[qs], k_pos[ks])
            if c == FULL:
                full.append(ks)
            elif c != EMPTY:
                partial += _partial_jobs(spec, q_pos, k_pos, qs, ks, tile)
        rows.append((qs, full))
    return _full_jobs(rows) + partial


def needs(spec: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Whether any local query may attend any key of the source (so its K/V must reach this rank).

    Conservative (a PARTIAL class may hide an empty block): every rank evaluates it for every member,
    so all ranks agree on each source's route without communicating.
    """
    for qs in runs(q_pos, None, spec.starts):
        for ks in runs(k_pos, None, spec.starts):
            if spec.classify(q_pos[qs], k_pos[ks]) != EMPTY:
                return True
    return False


def _first_writes(spans: list[list[slice]], n: int) -> tuple[list[bool], torch.Tensor]:
    """For row spans written in this order: whether each one writes only fresh rows (so it may
    initialise them by copying), and bool ``[n]`` of the rows to pre-fill (first written by a span
    that also covers older rows, or never written)."""
    touched = torch.zeros(n, dtype=torch.bool)
    prefill = torch.zeros(n, dtype=torch.bool)
    fresh: list[bool] = []
    for parts in spans:
        f = not any(bool(touched[s].any()) for s in parts)
        for s in parts:
            if not f:
                prefill[s] |= ~touched[s]
            touched[s] = True
        fresh.append(f)
    return fresh, prefill | ~touched


def schedule(order: list[list[Job]], n_q: int, n_k: int) -> tuple[list[slice], list[list[slice]]]:
    """Mark the jobs of ``order`` (one job list per key source, in execution order) for in-place execution.

    Sets ``init`` (first write of its query rows), ``guard`` (a merge where both sides may be empty)
    and ``k_init`` (first dK/dV write of its key rows within its source). Returns the query rows and,
    per source, the key rows that must be pre-filled (out 0 / lse −inf / dq 0; dK/dV 0).
    """
    jobs = [j for js in order for j in js]
    fresh, q_prefill = _first_writes([[j.q] for j in jobs], n_q)
    maybe_empty = torch.ones(n_q, dtype=torch.bool)  # the running lse of a row may still be −inf
    for job, f in zip(jobs, fresh):
        job.init = f
        job.guard = job.kind == "masked" and not f and bool(maybe_empty[job.q].any())
        if job.kind != "masked":
            maybe_empty[job.q] = False
    k_prefill = []
    for js in order:
        k_fresh, pre = _first_writes([j.k for j in js], n_k)
        for job, f in zip(js, k_fresh):
            job.k_init = f
        k_prefill.append(_true_slices(pre))
    return _true_slices(q_prefill), k_prefill


def _count(phase: str, job: Job, batch: int, heads: int) -> None:
    active, exact = work_wanted()
    if not active:
        return
    computed = batch * job.sq * job.sk * heads
    allowed = None
    if exact:
        if job.kind == "full":
            allowed = computed
        elif job.kind == "causal":
            allowed = batch * heads * job.sq * (job.sq + 1) // 2
        else:
            d = job.placed.dense(heads)  # [Hm, Sq, Sk], one tile pair
            allowed = batch * int(d.sum()) * (heads // d.shape[0])
    record_work(phase, computed, allowed)


def prefill_out(out: torch.Tensor, lse: torch.Tensor, rows: list[slice]) -> None:
    """Rows no call initialises start empty: out 0, lse −inf."""
    for s in rows:
        out[:, s].zero_()
        lse[:, :, s].fill_(float("-inf"))


def heads_first(backend: ModuleType) -> bool:
    """Whether ``backend`` reads q/k/v fastest stored heads-first (``[B, H, S, D]`` memory behind the
    logical ``[B, S, H, D]``): its ``LAYOUT`` is ``"heads"`` (the aten CPU kernel: each head's rows one
    dense block; in bf16 a forward call takes about 0.9× the time of the token-major layout flash-attn's API
    takes, in float32 0.95–0.99×: ``longreach bench kernels --suite layout``)."""
    return getattr(backend, "LAYOUT", "tokens") == "heads"


def forward_buffers(q: torch.Tensor, e: int, dtype: torch.dtype, *, heads: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries every call of a forward reads and its running result: ``(q, out, lse)``.

    With ``heads`` (:func:`heads_first`) q is copied heads-first once (every call of every step then reads
    dense head blocks) and out ``[B, Sq, H, E]`` is stored heads-first too; lse is ``[B, H, Sq]``. out and
    lse are uninitialised (:func:`prefill_out` fills rows no call covers)."""
    b, sq, h, _ = q.shape
    if heads:
        q = heads_major(q)
        out = torch.empty(b, h, sq, e, dtype=dtype, device=q.device).transpose(1, 2)  # [B, Sq, H, E]
    else:
        out = torch.empty(b, sq, h, e, dtype=dtype, device=q.device)  # [B, Sq, H, E]
    return q, out, torch.empty((b, h, sq), dtype=dtype, device=q.device)


def token_major(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A forward's result ``[B, S, H, E]`` as the caller gets it: in ``dtype``, stored token-major like the
    caller's q, in one copy (the cast and the layout change together), none if it already is."""
    if out.dtype == dtype and out.is_contiguous():
        return out
    return torch.empty(out.shape, dtype=dtype, device=out.device).copy_(out)


def pack_kv(k: torch.Tensor, v: torch.Tensor, *, heads: bool = False) -> torch.Tensor:
    """K and V in one buffer (one message per step) from which :func:`unpack_kv` takes each back as a dense
    tensor: ``[2, B, Sk, Hkv, D]`` when K and V have one shape (``[2, B, Hkv, Sk, D]`` with ``heads``: each
    head's keys one dense block, see :func:`heads_first`), else ``[B, Sk, Hkv, D+E]``."""
    if k.shape == v.shape:
        if heads:
            return torch.stack([k.transpose(1, 2), v.transpose(1, 2)])
        return torch.stack([k, v])
    return torch.cat([k, v], dim=-1)


def packed_shape(k: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """Shape of the token-major :func:`pack_kv` buffer of ``k`` and ``v`` (dK/dV accumulators)."""
    if k.shape == v.shape:
        return (2,) + tuple(k.shape)
    return tuple(k.shape[:-1]) + (k.shape[-1] + v.shape[-1],)


def unpack_kv(kv: torch.Tensor, d: int, *, heads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) ``[B, Sk, Hkv, ·]`` views of a :func:`pack_kv` buffer packed with the same ``heads`` (or of a
    buffer of that shape, e.g. dK/dV); ``d``: K's head size."""
    if kv.dim() == 5:
        if heads:
            return kv[0].transpose(1, 2), kv[1].transpose(1, 2)
        return kv[0], kv[1]
    return kv[..., :d], kv[..., d:]


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor, *,
               guard: bool) -> None:
    """In-place form of :func:`longreach.kernels.merge.merge_attention` for a running result.

    ``out`` ``[B, S, H, E]`` and ``lse`` ``[B, H, S]`` (accumulation dtype, views are fine) absorb a
    block's result: L ← log(e^L + e^Lb), O ← O + σ(Lb − L)(Ob − O). One side empty (−inf) needs no
    care (σ gives 0 or 1, and an empty running row holds out = 0); ``guard`` covers rows empty on both
    sides, where Lb − L is NaN.
    """
    d = block_lse.to(lse.dtype) - lse  # [B, H, S]
    torch.logaddexp(lse, block_lse.to(lse.dtype), out=lse)
    if guard:
        d.nan_to_num_(nan=float("-inf"))
    w = d.sigmoid_().transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    out.lerp_(block_out.to(out.dtype), w)


def forward_jobs(jobs: list[Job], backend: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, *, scale: float) -> None:
    """Run ``jobs`` into the running ``out`` ``[B, Sq, H, E]`` / ``lse`` ``[B, H, Sq]`` in place."""
    for job in jobs:
        qs = q[:, job.q]  # [B, sq, H, D]
        ks, vs = take(k, job.k), take(v, job.k)  # [B, sk, Hkv, D|E]
        o, l = backend.forward(qs, ks, vs, mask=job.placed, scale=scale)
        if job.init:
            out[:, job.q].copy_(o)
            lse[:, :, job.q].copy_(l)
        else:
            merge_into(out[:, job.q], lse[:, :, job.q], o, l, guard=job.guard)
        _count("fwd", job, q.shape[0], q.shape[2])


def _write(dst: torch.Tensor, src: torch.Tensor, init: bool) -> None:
    if init:
        dst.copy_(src)
    else:
        dst.add_(src)


@lru_cache(maxsize=32)
def _takes_grad_dtype(backward) -> bool:
    return "grad_dtype" in inspect.signature(backward).parameters


def partial_grad_dtype(backend: ModuleType, q: torch.Tensor, jobs: list[Job] | None = None) -> torch.dtype | None:
    """The ``grad_dtype`` to ask ``backend.backward`` for in one step of ``jobs`` whose results are partial
    sums: float32 for reduced-precision inputs on CPU when the step takes several kernel calls (and the
    backend supports the keyword); None (the input dtype) otherwise.

    The rule: a step's contribution to a gradient is rounded to the input dtype at most once. A step done
    in one kernel call hands its partials over in the input dtype, as flash-attn rings do (flash-attn writes
    gradients in the input dtype; on CPU a float32 partial costs a float32 run of the aten kernel on float32
    copies, 1.2–1.3× the bf16 backward call); a step the mask splits into several calls (document or
    pattern tiles) gets float32 partials, so splitting a step never costs accuracy over one call per step.
    ``jobs`` None: the caller sums the results of one call with others (replicated K/V heads)."""
    if q.dtype in (torch.float32, torch.float64) or q.device.type != "cpu" or not _takes_grad_dtype(backend.backward):
        return None
    if jobs is not None and len(jobs) <= 1:
        return None
    return torch.float32


def backward_jobs(jobs: list[Job], backend: ModuleType, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                  dv: torch.Tensor, *, scale: float, grad_dtype: torch.dtype | None = None) -> None:
    """Each job's gradients (from the global ``out``/``lse``) into ``dq``/``dk``/``dv`` in place.

    The accumulators are in float32 (float64 for float64 inputs) whatever the input dtype, so partial
    gradients are summed across calls and ring steps in float32 and rounded once at the end; with
    ``grad_dtype`` (:func:`partial_grad_dtype`) the backend hands them over unrounded too.
    """
    extra = {} if grad_dtype is None else {"grad_dtype": grad_dtype}
    for job in jobs:
        ks, vs = take(k, job.k), take(v, job.k)
        gq, gk, gv = backend.backward(dout[:, job.q], q[:, job.q], ks, vs, out[:, job.q], lse[:, :, job.q],
                                      mask=job.placed, scale=scale, **extra)
        _write(dq[:, job.q], gq, job.init)
        off = 0
        for s in job.k:
            n = s.stop - s.start
            _write(dk[:, s], gk[:, off:off + n], job.k_init)
            _write(dv[:, s], gv[:, off:off + n], job.k_init)
            off += n
        _count("bwd", job, q.shape[0], q.shape[2])
