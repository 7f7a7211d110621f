"""The mask algebra: :class:`Mask`, its placement on a call's positions, ``&``/``|``, and the basic factories.

The sparse patterns of papers (PowerAttention, LongLoRA S2, SinkLoRA SF, SSA) are built on these
classes in :mod:`longreach.kernels.masks.patterns`; :mod:`longreach.kernels.masks` exports both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .._regions import INF, Region, intersect_lists, union_lists

EMPTY, PARTIAL, FULL = 0, 1, 2


def _as_pos(x: torch.Tensor | Sequence[int]) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    return t.reshape(-1)


class Mask:
    """Base class. Subclasses implement :meth:`dense`; analytic ones also :meth:`_classify_ranges`."""

    #: True when the mask allows no key after the query (j ≤ i for every allowed pair).
    is_causal: bool = False
    #: True when the pattern differs between heads.
    per_head: bool = False

    # --- elementwise -------------------------------------------------------------------------
    def dense(self, q_pos: torch.Tensor, k_pos: torch.Tensor, *, heads: torch.Tensor | None = None,
              num_heads: int = 1, seq_len: int | None = None) -> torch.Tensor:
        """Allowed pairs, ``bool [Hm, Sq, Sk]`` (Hm = 1 unless :attr:`per_head`)."""
        raise NotImplementedError

    # --- block answers -----------------------------------------------------------------------
    def _classify_ranges(
        self,
        qmin: torch.Tensor,
        qmax: torch.Tensor,
        kmin: torch.Tensor,
        kmax: torch.Tensor,
        *,
        heads: torch.Tensor,
        num_heads: int,
        seq_len: int,
    ) -> torch.Tensor | None:
        """Classify tiles from the min/max positions of each tile ([nQ,1] and [1,nK] tensors).

        Returns int8 ``[Hm, nQ, nK]`` or None when the mask has no analytic answer (the caller then
        falls back to the dense pattern). Must be conservative: the answer has to hold for *any*
        position sets within the given bounds.
        """
        return None

    def block_map(
        self,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        *,
        block_q: int,
        block_k: int,
        heads: torch.Tensor | None = None,
        num_heads: int = 1,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """Tile classification ``int8 [Hm, ceil(Sq/block_q), ceil(Sk/block_k)]``."""
        q_pos, k_pos = _as_pos(q_pos), _as_pos(k_pos)
        heads = torch.arange(num_heads) if heads is None else _as_pos(heads)
        seq_len = _default_seq_len(seq_len, q_pos, k_pos)
        qmin, qmax = _tile_bounds(q_pos, block_q)
        kmin, kmax = _tile_bounds(k_pos, block_k)
        res = self._classify_ranges(
            qmin[:, None], qmax[:, None], kmin[None, :], kmax[None, :],
            heads=heads, num_heads=num_heads, seq_len=seq_len,
        )
        if res is not None:
            return res.to(torch.int8)
        d = self.dense(q_pos, k_pos, heads=heads, num_heads=num_heads, seq_len=seq_len)
        return _reduce_tiles(d, block_q, block_k)

    def classify(self, q_pos: torch.Tensor, k_pos: torch.Tensor, *, heads: torch.Tensor | None = None,
                 num_heads: int = 1, seq_len: int | None = None) -> torch.Tensor:
        """Whole-block classification per head, ``int8 [Hm]``."""
        q_pos, k_pos = _as_pos(q_pos), _as_pos(k_pos)
        if q_pos.numel() == 0 or k_pos.numel() == 0:
            return torch.full((1,), EMPTY, dtype=torch.int8)
        bm = self.block_map(
            q_pos, k_pos, block_q=max(1, q_pos.numel()), block_k=max(1, k_pos.numel()),
            heads=heads, num_heads=num_heads, seq_len=seq_len,
        )
        return bm[:, 0, 0]

    # --- slices ------------------------------------------------------------------------------
    def regions(self, head: int, num_heads: int, seq_len: int) -> list[Region] | None:
        """The pattern of global head ``head`` as a list of disjoint :class:`Region` (global positions
        0..seq_len-1), or None when the mask has no analytic form (planners then fall back to tiles)."""
        return None

    def key(self) -> object:
        """A hashable value equal for masks with the same pattern (plan caches key on it)."""
        return self

    # --- context and algebra -----------------------------------------------------------------
    def at(self, *, step: int = 0, layer: int = 0) -> "Mask":
        """This mask for a given training step and layer (only random masks depend on them)."""
        return self

    def __and__(self, other: "Mask") -> "Mask":
        return _And(self, other)

    def __or__(self, other: "Mask") -> "Mask":
        return _Or(self, other)

    def place(
        self,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        *,
        seq_len: int,
        heads: torch.Tensor | None = None,
        num_heads: int | None = None,
    ) -> "PlacedMask":
        """Bind this mask to concrete global positions (what local backends receive)."""
        return PlacedMask(self, _as_pos(q_pos), _as_pos(k_pos), seq_len, heads, num_heads)


@dataclass(frozen=True)
class PlacedMask:
    """A mask bound to the global positions of local queries and keys.

    ``heads`` are the global indices of the local query heads (None: all ``num_heads``), which is
    what lets per-head masks work after Ulysses splits heads across ranks.
    """

    mask: Mask
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    seq_len: int
    heads: torch.Tensor | None = None
    num_heads: int | None = None

    def _heads(self, local_heads: int) -> tuple[torch.Tensor, int]:
        heads = torch.arange(local_heads) if self.heads is None else _as_pos(self.heads)
        return heads, (self.num_heads if self.num_heads is not None else int(heads.max()) + 1)

    def dense(self, local_heads: int) -> torch.Tensor:
        heads, nh = self._heads(local_heads)
        return self.mask.dense(self.q_pos, self.k_pos, heads=heads, num_heads=nh, seq_len=self.seq_len)

    def block_map(self, local_heads: int, block_q: int, block_k: int) -> torch.Tensor:
        heads, nh = self._heads(local_heads)
        return self.mask.block_map(
            self.q_pos, self.k_pos, block_q=block_q, block_k=block_k, heads=heads, num_heads=nh,
            seq_len=self.seq_len,
        )

    def classify(self, local_heads: int) -> torch.Tensor:
        heads, nh = self._heads(local_heads)
        return self.mask.classify(self.q_pos, self.k_pos, heads=heads, num_heads=nh, seq_len=self.seq_len)

    @property
    def is_causal(self) -> bool:
        return self.mask.is_causal

    def slice(self, q_index: slice | torch.Tensor | None = None, k_index: slice | torch.Tensor | None = None
              ) -> "PlacedMask":
        """The same mask on a subset of the local queries / keys."""
        q = self.q_pos if q_index is None else self.q_pos[q_index]
        k = self.k_pos if k_index is None else self.k_pos[k_index]
        return PlacedMask(self.mask, q, k, self.seq_len, self.heads, self.num_heads)


def place(
    mask: Mask | PlacedMask | None, sq: int, sk: int, *, seq_len: int | None = None,
    num_heads: int | None = None,
) -> PlacedMask | None:
    """Normalise a backend's ``mask`` argument.

    A plain :class:`Mask` on local tensors is placed with keys at 0..Sk-1 and queries aligned to
    the end of the keys (bottom-right, the convention for a query suffix such as decoding).
    """
    if mask is None or isinstance(mask, PlacedMask):
        return mask
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a longreach.kernels.masks.Mask, a PlacedMask or None, got {type(mask)!r}")
    seq_len = sk if seq_len is None else seq_len
    return mask.place(torch.arange(sk - sq, sk), torch.arange(sk), seq_len=seq_len, num_heads=num_heads)


def _default_seq_len(seq_len: int | None, q_pos: torch.Tensor, k_pos: torch.Tensor) -> int:
    if seq_len is not None:
        return int(seq_len)
    hi = 0
    if q_pos.numel():
        hi = max(hi, int(q_pos.max()) + 1)
    if k_pos.numel():
        hi = max(hi, int(k_pos.max()) + 1)
    return hi


def _tile_bounds(pos: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = pos.numel()
    nt = (n + block - 1) // block
    pad = nt * block - n
    if pad:
        lo = torch.cat([pos, pos[-1:].expand(pad)])
    else:
        lo = pos
    tiles = lo.view(nt, block)
    return tiles.min(dim=1).values, tiles.max(dim=1).values


def _reduce_tiles(d: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Dense bool [Hm, Sq, Sk] -> int8 [Hm, nQ, nK] tile classification (exact)."""
    hm, sq, sk = d.shape
    nq, nk = (sq + block_q - 1) // block_q, (sk + block_k - 1) // block_k
    x = torch.zeros(hm, nq * block_q, nk * block_k, dtype=torch.int32)
    valid = torch.zeros_like(x)
    x[:, :sq, :sk] = d.to(torch.int32)
    valid[:, :sq, :sk] = 1
    x = x.view(hm, nq, block_q, nk, block_k).sum(dim=(2, 4))
    n = valid.view(hm, nq, block_q, nk, block_k).sum(dim=(2, 4))
    out = torch.full((hm, nq, nk), PARTIAL, dtype=torch.int8)
    out[x == 0] = EMPTY
    out[(x == n) & (n > 0)] = FULL
    return out


def _settle_tiles(mask: Mask, res: torch.Tensor, todo: torch.Tensor, q_pos, k_pos, *, block_q, block_k,
                  heads=None, num_heads=1, seq_len=None) -> torch.Tensor:
    """Replace the tiles flagged in ``todo [Hm, nQ, nK]`` by their exact class, evaluating the dense
    pattern only on those tiles (one ``dense`` call per query-tile row), never on the whole block."""
    q_pos, k_pos = _as_pos(q_pos), _as_pos(k_pos)
    heads = torch.arange(num_heads) if heads is None else _as_pos(heads)
    seq_len = _default_seq_len(seq_len, q_pos, k_pos)
    res = res.expand(todo.shape).clone()
    any_head = todo.any(dim=0)  # [nQ, nK]
    for qt in any_head.any(dim=1).nonzero().reshape(-1).tolist():
        kts = any_head[qt].nonzero().reshape(-1).tolist()
        qp = q_pos[qt * block_q:(qt + 1) * block_q]
        kidx = torch.cat([torch.arange(t * block_k, min(k_pos.numel(), (t + 1) * block_k)) for t in kts])
        d = mask.dense(qp, k_pos[kidx], heads=heads, num_heads=num_heads, seq_len=seq_len)  # [Hd, bq, n]
        for t in kts:
            tile = d[:, :, (kidx >= t * block_k) & (kidx < (t + 1) * block_k)].flatten(1)  # [Hd, bq*bk]
            cls = torch.full((d.shape[0],), PARTIAL, dtype=torch.int8)
            cls[~tile.any(1)] = EMPTY
            cls[tile.all(1)] = FULL
            res[:, qt, t] = torch.where(todo[:, qt, t], cls.expand(res.shape[0]), res[:, qt, t])
    return res


def _full_tiles(qmin: torch.Tensor, kmin: torch.Tensor, value: int) -> torch.Tensor:
    return torch.full((1, qmin.shape[0], kmin.shape[1]), value, dtype=torch.int8)


def _where3(empty: torch.Tensor, full_: torch.Tensor) -> torch.Tensor:
    out = torch.full(torch.broadcast_shapes(empty.shape, full_.shape), PARTIAL, dtype=torch.int8)
    out = torch.where(full_, torch.tensor(FULL, dtype=torch.int8), out)
    out = torch.where(empty, torch.tensor(EMPTY, dtype=torch.int8), out)
    return out


# --------------------------------------------------------------------------------------------
# Elementary masks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Full(Mask):
    """Every pair allowed (non-causal)."""

    def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
        return torch.ones(1, _as_pos(q_pos).numel(), _as_pos(k_pos).numel(), dtype=torch.bool)

    def _classify_ranges(self, qmin, qmax, kmin, kmax, *, heads, num_heads, seq_len):
        return _full_tiles(qmin, kmin, FULL)

    def regions(self, head, num_heads, seq_len):
        return [Region(0, seq_len, 0, seq_len)]


def _require_at_least(what: str, value: int, low: int) -> None:
    if int(value) < low:
        raise ValueError(f"{what} must be >= {low}, got {value}")


class _Pairwise(Mask):
    """A head-independent mask given by a predicate on (query position, key position)."""

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Elementwise on broadcast positions ``q [Sq, 1]``, ``k [1, Sk]``."""
        raise NotImplementedError

    def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
        return self.allowed(_as_pos(q_pos)[:, None], _as_pos(k_pos)[None, :])[None]  # [1, Sq, Sk]


@dataclass(frozen=True)
class _Causal(_Pairwise):
    is_causal = True

    def allowed(self, q, k):
        return k <= q

    def _classify_ranges(self, qmin, qmax, kmin, kmax, *, heads, num_heads, seq_len):
        return _where3(qmax < kmin, qmin >= kmax)[None]

    def regions(self, head, num_heads, seq_len):
        return [Region(0, seq_len, 0, seq_len, 0, INF)]


@dataclass(frozen=True)
class _SlidingWindow(_Pairwise):
    window: int
    is_causal = True

    def __post_init__(self):
        _require_at_least("sliding_window: window", self.window, 1)

    def allowed(self, q, k):
        return (q - k >= 0) & (q - k < self.window)

    def _classify_ranges(self, qmin, qmax, kmin, kmax, *, heads, num_heads, seq_len):
        max_diff, min_diff = qmax - kmin, qmin - kmax
        return _where3((max_diff < 0) | (min_diff >= self.window), (min_diff >= 0) & (max_diff < self.window))[None]

    def regions(self, head, num_heads, seq_len):
        return [Region(0, seq_len, 0, seq_len, 0, self.window - 1)]


@dataclass(frozen=True)
class _Sinks(_Pairwise):
    n: int
    is_causal = True

    def __post_init__(self):
        _require_at_least("sinks: n", self.n, 0)

    def allowed(self, q, k):
        return (k < self.n) & (k <= q)

    def _classify_ranges(self, qmin, qmax, kmin, kmax, *, heads, num_heads, seq_len):
        return _where3((kmin >= self.n) | (qmax < kmin), (kmax < self.n) & (qmin >= kmax))[None]

    def regions(self, head, num_heads, seq_len):
        return [Region(0, seq_len, 0, min(self.n, seq_len), 0, INF)] if self.n > 0 else []


@dataclass(frozen=True, eq=False)
class _Documents(Mask):
    """Causal attention inside each packed document; ``cu_seqlens`` are global offsets."""

    cu_seqlens: torch.Tensor
    is_causal = True

    def __post_init__(self):
        cu = _as_pos(self.cu_seqlens)
        if cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                "documents: cu_seqlens must start at 0 and be non-decreasing, "
                f"got {cu.tolist()[:8]}{'…' if cu.numel() > 8 else ''}"
            )
        object.__setattr__(self, "cu_seqlens", cu)

    def doc_ids(self, pos: torch.Tensor) -> torch.Tensor:
        # position p belongs to document d with cu[d] <= p < cu[d+1]
        return torch.searchsorted(self.cu_seqlens, _as_pos(pos).contiguous(), right=True) - 1

    def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
        q, k = _as_pos(q_pos), _as_pos(k_pos)
        dq, dk = self.doc_ids(q), self.doc_ids(k)
        return ((dq[:, None] == dk[None, :]) & (k[None, :] <= q[:, None]))[None]

    def _classify_ranges(self, qmin, qmax, kmin, kmax, *, heads, num_heads, seq_len):
        d_qmin, d_qmax = self.doc_ids(qmin.reshape(-1)).view_as(qmin), self.doc_ids(qmax.reshape(-1)).view_as(qmax)
        d_kmin, d_kmax = self.doc_ids(kmin.reshape(-1)).view_as(kmin), self.doc_ids(kmax.reshape(-1)).view_as(kmax)
        empty = (qmax < kmin) | (d_kmax < d_qmin) | (d_kmin > d_qmax)
        one_doc = (d_qmin == d_qmax) & (d_kmin == d_kmax) & (d_qmin == d_kmin)
        return _where3(empty, one_doc & (qmin >= kmax))[None]

    def regions(self, head, num_heads, seq_len):
        cu = self.cu_seqlens.clamp(max=seq_len).tolist()
        bounds = cu + ([seq_len] if cu[-1] < seq_len else [])  # positions past the last offset: one more document
        return [Region(a, b, a, b, 0, INF) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def key(self):
        return ("documents", tuple(self.cu_seqlens.tolist()))


@dataclass(frozen=True, eq=False)
class _Combined(Mask):
    """``a & b`` or ``a | b``: subclasses name the elementwise, tile-class and region operations."""

    a: Mask
    b: Mask

    _name = ""
    _pairs = staticmethod(torch.logical_and)  # elementwise patterns
    _classes = staticmethod(torch.minimum)  # tile classes EMPTY < PARTIAL < FULL
    _region_lists = staticmethod(intersect_lists)

    @property
    def per_head(self) -> bool:  # type: ignore[override]
        return self.a.per_head or self.b.per_head

    def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
        kw = dict(heads=heads, num_heads=num_heads, seq_len=seq_len)
        return self._pairs(self.a.dense(q_pos, k_pos, **kw), self.b.dense(q_pos, k_pos, **kw))

    def _classify_ranges(self, qmin, qmax, kmin, kmax, **kw):
        ra = self.a._classify_ranges(qmin, qmax, kmin, kmax, **kw)
        rb = self.b._classify_ranges(qmin, qmax, kmin, kmax, **kw)
        if ra is None or rb is None:
            return None
        return self._classes(ra, rb)

    def block_map(self, q_pos, k_pos, *, block_q, block_k, heads=None, num_heads=1, seq_len=None):
        kw = dict(block_q=block_q, block_k=block_k, heads=heads, num_heads=num_heads, seq_len=seq_len)
        ra, rb = self.a.block_map(q_pos, k_pos, **kw), self.b.block_map(q_pos, k_pos, **kw)
        res = self._classes(ra, rb)
        # Two PARTIAL halves may still be exactly EMPTY or FULL: settle those tiles densely.
        both_partial = (ra == PARTIAL) & (rb == PARTIAL)
        if bool(both_partial.any()):
            res = _settle_tiles(self, res, both_partial, q_pos, k_pos, **kw)
        return res

    def at(self, *, step=0, layer=0):
        return type(self)(self.a.at(step=step, layer=layer), self.b.at(step=step, layer=layer))

    def regions(self, head, num_heads, seq_len):
        ra = self.a.regions(head, num_heads, seq_len)
        rb = None if ra is None else self.b.regions(head, num_heads, seq_len)
        return None if rb is None else self._region_lists(ra, rb)

    def key(self):
        return (self._name, self.a.key(), self.b.key())


@dataclass(frozen=True, eq=False)
class _And(_Combined):
    _name = "and"

    @property
    def is_causal(self) -> bool:  # type: ignore[override]
        return self.a.is_causal or self.b.is_causal


@dataclass(frozen=True, eq=False)
class _Or(_Combined):
    _name = "or"
    _pairs = staticmethod(torch.logical_or)
    _classes = staticmethod(torch.maximum)
    _region_lists = staticmethod(union_lists)

    @property
    def is_causal(self) -> bool:  # type: ignore[override]
        return self.a.is_causal and self.b.is_causal


# --------------------------------------------------------------------------------------------
# Factories (public)
# --------------------------------------------------------------------------------------------


def full() -> Mask:
    """Every query attends every key (non-causal)."""
    return _Full()


def causal() -> Mask:
    """Key j visible to query i iff j ≤ i."""
    return _Causal()


def sliding_window(w: int) -> Mask:
    """Causal sliding window: key j visible to query i iff 0 ≤ i−j < w."""
    return _SlidingWindow(int(w))


def sinks(n: int) -> Mask:
    """The first ``n`` tokens, visible to every query at or after them (j < n and j ≤ i)."""
    return _Sinks(int(n))


def documents(cu_seqlens: torch.Tensor | Sequence[int]) -> Mask:
    """Causal attention within packed documents; ``cu_seqlens`` are the global document offsets."""
    return _Documents(_as_pos(cu_seqlens))
