"""``cp_attention``: the one public entry point of softmax context parallelism (ARCHITECTURE.md §2)."""
from __future__ import annotations

import math
from collections import OrderedDict
from types import ModuleType

import torch
import torch.distributed as dist

from longreach.kernels import get_backend
from longreach.kernels import masks as M
from longreach.kernels.api import resolve_backend

from ..ring_flash_adapter import try_attention as ring_flash_attention
from ..comm import CPGroup, group_ranks
from ..config import STRATEGIES
from ..layouts import LAYOUTS, DocumentZigzag, check_divisible, group_rank_size, layout_multiple, positions_for
from .allgather import AllGatherEngine, AllGatherPlan
from .hybrid import HybridEngine, HybridPlan

__all__ = ["STRATEGIES", "cp_attention", "layout_positions"]

Layout = str | DocumentZigzag

# Ulysses groups created for direct calls with a plain group, keyed by their global ranks (_ulysses_group)
_CREATED_ULYSSES: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _ulysses_group(group: dist.ProcessGroup | None, given: dist.ProcessGroup | None, ranks: list[int], rank: int,
                   degree: int) -> dist.ProcessGroup | None:
    """This rank's Ulysses group of ``degree`` consecutive ranks of ``group``.

    The mesh's own group when the caller passed a :class:`~longreach.parallel.comm.CPGroup` (what
    ``ParallelDims.cp_groups`` hands out, and what training uses). Direct calls with a plain group get
    one created on first use and kept in :data:`_CREATED_ULYSSES` (a cache of this module's own making,
    never filled from outside), so repeated calls do not create a group each.
    """
    if degree == 1:
        return None
    if degree == len(ranks):
        return group
    if given is not None:
        if dist.get_world_size(given) != degree:
            raise ValueError(f"cp_attention: the Ulysses group of the given CPGroup has {dist.get_world_size(given)} "
                             f"ranks, but ulysses_degree={degree}")
        return given
    g = rank // degree
    members = tuple(ranks[g * degree:(g + 1) * degree])
    if members not in _CREATED_ULYSSES:
        # only the members create (and rendezvous on) their own group
        _CREATED_ULYSSES[members] = dist.new_group(list(members), use_local_synchronization=True)
    return _CREATED_ULYSSES[members]


def layout_positions(layout: Layout, seq_len: int, rank: int, world_size: int) -> torch.Tensor:
    """Global positions held by ``rank`` under a layout name or a :class:`DocumentZigzag`."""
    if isinstance(layout, DocumentZigzag):
        layout.check(seq_len, world_size)
        return layout.positions(rank, world_size)
    return positions_for(seq_len, layout, rank, world_size)


def chunk_starts(layout: Layout, seq_len: int, world_size: int) -> torch.Tensor:
    """bool ``[seq_len]``: True at the first position of every chunk of ``layout``."""
    starts = torch.zeros(seq_len, dtype=torch.bool)
    if isinstance(layout, DocumentZigzag):
        for a, b in zip(layout.cu_seqlens[:-1].tolist(), layout.cu_seqlens[1:].tolist()):
            c = (b - a) // (2 * world_size)
            if c:
                starts[a:b:c] = True
    elif layout in ("contiguous", "zigzag"):
        starts[::seq_len // layout_multiple(layout, world_size)] = True
    return starts


def _degree(strategy: str, ulysses_degree: int | None, world: int) -> int:
    if strategy == "hybrid":
        if ulysses_degree is None:
            raise ValueError("strategy='hybrid' needs ulysses_degree (ranks per Ulysses group)")
        if int(ulysses_degree) < 1 or world % int(ulysses_degree) != 0:
            raise ValueError(
                f"ulysses_degree={ulysses_degree} must divide the context-parallel group size ({world}) "
                "for strategy='hybrid'"
            )
        return int(ulysses_degree)
    if strategy == "ulysses":
        if ulysses_degree is not None and int(ulysses_degree) != world:
            raise ValueError(
                f"ulysses_degree={ulysses_degree} does not match the group size ({world}) for strategy='ulysses'; "
                "use strategy='hybrid' to combine Ulysses groups with a ring"
            )
        return world
    if ulysses_degree is not None and int(ulysses_degree) != 1:
        raise ValueError(f"ulysses_degree={ulysses_degree} is only used by strategy='hybrid' or 'ulysses', "
                         f"not strategy={strategy!r}")
    return 1


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str, layout: Layout, world: int,
              mask: M.Mask | None, ulysses_degree: int | None) -> int:
    """Every check that can fail, on local facts only, so all ranks raise the same error before any
    communication. Returns the Ulysses degree."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context-parallel strategy={strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not isinstance(layout, DocumentZigzag) and layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout={layout!r}; choose one of {', '.join(LAYOUTS)} "
                         "or a longreach.parallel.DocumentZigzag")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"cp_attention expects [B, S, H, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} "
                         f"v{tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"cp_attention: q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)} disagree "
                         "(batch and local sequence length must match, k and v share heads, q and k head_dim)")
    h, hkv = q.shape[2], k.shape[2]
    if h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    if mask is not None and not isinstance(mask, M.Mask):
        raise TypeError("cp_attention: mask must be a longreach.kernels.masks.Mask over global positions "
                        f"(not {type(mask).__name__}); cp_attention places it itself")
    seq_len = q.shape[1] * world
    if isinstance(layout, DocumentZigzag):
        layout.check(seq_len, world)
    else:
        check_divisible(seq_len, layout=layout, cp=world,
                        setting=f"sequence length ({q.shape[1]} local tokens × {world} ranks)")
    degree = _degree(strategy, ulysses_degree, world)
    if degree > 1:
        if h % degree != 0 and strategy == "ulysses":
            raise ValueError(f"strategy='ulysses' needs the query heads ({h}) to divide by the context-parallel "
                             f"group size ({degree}); use strategy='hybrid' with a ulysses_degree dividing {h} "
                             "(and the group size), or strategy='ring'")
        if h % degree != 0:
            raise ValueError(f"strategy={strategy!r} needs the query heads ({h}) to divide by the Ulysses degree "
                             f"({degree}); choose ulysses_degree dividing {h}")
        if hkv % degree != 0 and degree % hkv != 0:
            raise ValueError(f"strategy={strategy!r}: key/value heads ({hkv}) and Ulysses degree ({degree}) must "
                             "divide one another (K/V heads are split, or replicated when fewer than the degree)")
    return degree


def _effective_mask(causal: bool, mask: M.Mask | None) -> M.Mask:
    if mask is None:
        return M.causal() if causal else M.full()
    if causal and not mask.is_causal:
        return mask & M.causal()
    return mask


# Plans keyed by everything they depend on: (kind, group ranks or size, rank, [degree,] layout, seq_len,
# heads, [kv heads,] user mask, causal). Masks without value equality (documents) hit while the caller reuses the object (every
# layer of one step); the cache keeps the few most recent.
_PLANS: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 16


def _layout_key(layout: Layout) -> object:
    if isinstance(layout, DocumentZigzag):
        return ("doc_zigzag", tuple(layout.cu_seqlens.tolist()))
    return layout


def _cached(key: tuple, build):
    try:
        hash(key)
    except TypeError:  # a mask without a hash: plan every call
        return build()
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    value = build()
    _PLANS[key] = value
    while len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return value


def _all_positions(layout: Layout, seq_len: int, world: int) -> list[torch.Tensor]:
    return [layout_positions(layout, seq_len, r, world) for r in range(world)]


def _backend(name: str, q: torch.Tensor, mask: M.Mask) -> ModuleType:
    if name == "auto":  # the same choice as longreach.kernels.attention, for the effective mask
        try:
            name = resolve_backend("auto", q, mask)
            get_backend(name)
        except ImportError:
            name = "reference"
    return get_backend(name)


class _CPAttention(torch.autograd.Function):
    """Wraps an engine's explicit forward/backward (``forward(q,k,v)``, ``backward(dout, saved)``)."""

    @staticmethod
    def forward(ctx, q, k, v, engine):  # type: ignore[override]
        out, lse, saved = engine.forward(q, k, v)
        ctx.engine = engine
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        dq, dk, dv = ctx.engine.backward(dout, ctx.saved_tensors)
        return dq, dk, dv, None


def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    strategy: str,
    layout: Layout,
    group: dist.ProcessGroup | CPGroup | None = None,
    causal: bool = True,
    mask: M.Mask | None = None,
    scale: float | None = None,
    ulysses_degree: int | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over a sequence split across the ranks of ``group``.

    Every rank passes its own tokens, sharded with ``shard_sequence(x, layout=layout, group=group)``.

    Args:
        q: ``[B, S/P, H, D]`` local queries; k: ``[B, S/P, Hkv, D]``; v: ``[B, S/P, Hkv, E]`` (H a
            multiple of Hkv; K/V are communicated with their own heads, never expanded).
        strategy: ``"ring"``, ``"ulysses"``, ``"hybrid"`` or ``"allgather"``.
        layout: ``"contiguous"``, ``"zigzag"``, ``"stripe"`` or a :class:`DocumentZigzag`.
        group: the whole context-parallel group (default WORLD), or a :class:`~longreach.parallel.comm.CPGroup`
            carrying the mesh's Ulysses sub-group for ``hybrid`` (``ParallelDims.cp_groups(mesh)``).
        causal: intersect ``mask`` with causal; False applies ``mask`` exactly as given (None: full).
        mask: a :mod:`longreach.kernels.masks` mask over *global* positions and heads.
        scale: softmax scale, default ``1/sqrt(D)``.
        ulysses_degree: for ``hybrid``: ranks per Ulysses group (consecutive ranks); ring groups are strided.
        backend: local attention backend; ``"auto"`` chooses as :func:`longreach.kernels.attention` does.
        return_lse: also return the local log-sum-exp (not differentiable).

    Returns:
        out ``[B, S/P, H, E]`` (dtype of q), or ``(out, lse)`` with lse ``[B, H, S/P]`` float32
        (float64 for float64 inputs; −inf for rows with no allowed key).

    Raises:
        ValueError/TypeError naming the setting, on every rank, before any communication.
    """
    ulysses = group.ulysses if isinstance(group, CPGroup) else None
    group = group.group if isinstance(group, CPGroup) else group
    rank, world = group_rank_size(group)
    if rank < 0:
        raise ValueError("cp_attention: this rank is not a member of the given group")
    degree = _validate(q, k, v, strategy=strategy, layout=layout, world=world, mask=mask,
                       ulysses_degree=ulysses_degree)
    n, h, d = q.shape[1], q.shape[2], q.shape[3]
    seq_len = n * world
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    eff = _effective_mask(causal, mask)
    if q.device.type == "cuda" and backend in ("auto", "flash"):
        routed = ring_flash_attention(q, k, v, strategy=strategy, layout=layout, group=group, causal=causal,
                                      mask=mask, scale=scale, return_lse=return_lse)
        if routed is not None:
            return routed
    backend_mod = _backend(backend, q, eff)
    if strategy == "allgather":
        key = ("allgather", rank, world, _layout_key(layout), seq_len, h, mask, causal)
        agplan = _cached(key, lambda: AllGatherPlan.build(
            rank=rank, positions=_all_positions(layout, seq_len, world), seq_len=seq_len, num_heads=h, mask=eff,
            starts=chunk_starts(layout, seq_len, world)))
        engine = AllGatherEngine(group=group, plan=agplan, backend=backend_mod, scale=scale)
    else:
        ranks = group_ranks(group) if world > 1 else [0]
        key = ("hybrid", tuple(ranks), rank, degree, _layout_key(layout), seq_len, h, k.shape[2], mask, causal)
        hplan = _cached(key, lambda: HybridPlan.build(
            peers=ranks, rank=rank, degree=degree, positions=_all_positions(layout, seq_len, world),
            seq_len=seq_len, num_heads=h, kv_heads=k.shape[2], mask=eff, starts=chunk_starts(layout, seq_len, world)))
        engine = HybridEngine(ulysses_group=_ulysses_group(group, ulysses, ranks, rank, degree), plan=hplan,
                              backend=backend_mod, scale=scale, want_lse=return_lse)
    out, lse = _CPAttention.apply(q, k, v, engine)
    return (out, lse) if return_lse else out
