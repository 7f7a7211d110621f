"""Sparse attention patterns: PowerAttention, LongLoRA S2, SinkLoRA SF, stochastic subsampling (SSA).

:mod:`longreach.kernels.masks` exports the ``power``/``s2``/``sf``/``ssa`` factories defined here. Every
pattern is a :class:`~longreach.kernels.masks.Mask` over *global* positions and *global* head ids, so it
means the same on every rank whatever the sequence layout or Ulysses head split. Where it is cheap,
a pattern also answers tile classification analytically from each tile's min/max positions; every such
answer is conservative for ANY position set inside those bounds (PARTIAL when unsure).

Definitions (PowerAttention; LongLoRA, Chen et al., 2023, §3.2; SinkLoRA, 2024; Information
Pathways, KDD 2023):

* ``power(block)``: key j visible to query i iff j ≤ i and ``i//block − j//block`` ∈ {0} ∪ {2^k}.
* ``s2(G, "varlen")``: heads h < H//2 attend causally inside groups [mG, (m+1)G); heads h ≥ H//2
  inside the segments [0, G/2), [G/2, 3G/2), …, [N−G/2, N) (segment id ``(p + G/2) // G``), causal.
* ``s2(G, "roll")``: shifted heads follow LongLoRA's no-flash path literally: roll by −G/2, causal
  attention inside groups of G, roll back. In original positions, with ``r(p) = (p − G/2) mod N``:
  allowed iff ``r(q)//G == r(k)//G`` and ``r(k) ≤ r(q)``. Queries 0…G/2−1 then see keys N−G/2…N−1
  (the wrap-around), so the mask is NOT causal (use it with ``causal=False``).
* ``sf(G, sinks=4)``: SinkLoRA SF-Attn. Our exact definition: the shifted heads' groups are
  "segmented and reassembled" back to their un-shifted positions, i.e. no group wraps around: the
  segments are [0, G/2), [G/2, 3G/2), …, [N−G/2, N) — the same pattern as ``s2(G, "varlen")`` (SinkLoRA ships
  no code, so the equivalence is unverified; this is the reading we implement). Unshifted heads as in S2.
  Plus ``sinks`` global sink tokens on every head: key j < sinks is visible to every query i ≥ j
  (causal sinks; the paper's sinks also see the future, which leaks in a causal LM).
* ``ssa(ratio, window=, block=, seed=, bias=)``: on blocks of ``block`` tokens, query block a keeps
  key block b (b ≤ a) when ``a − b < window`` (dense local window, in blocks) or when a hash of
  (seed, step, layer, head, a, b) falls below the keep probability p(a − b); inside kept blocks the
  pattern is token-causal. ``bias="uniform"``: p constant; ``bias="local"``: p(d) = min(1, c / (d −
  window + 1)) (decays with block distance). c (or the constant) is calibrated on the global block
  count so that the expected kept fraction of causal block pairs, window included, equals ``ratio``
  (when the window alone exceeds ratio nothing else is sampled). ``ratio >= 1`` is exactly causal.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from .._regions import INF, Region
from .algebra import Mask, _as_pos, _Or, _Sinks, _where3

__all__ = ["power", "s2", "sf", "ssa", "splitmix64", "ssa_keep_probability"]


def _heads_of(heads: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    return torch.arange(num_heads) if heads is None else _as_pos(heads)


def _floor_pow2(x: torch.Tensor) -> torch.Tensor:
    """Largest power of two ≤ x for x ≥ 1 (int64); 0 where x ≤ 0."""
    y = x.clamp(min=0).to(torch.int64)
    for s in (1, 2, 4, 8, 16, 32):
        y = y | (y >> s)
    return y - (y >> 1)


# --------------------------------------------------------------------------------------------
# PowerAttention
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Power(Mask):
    """PowerAttention: query block a sees key block b iff a − b ∈ {0} ∪ {2^k}; token-causal."""

    block: int
    is_causal = True

    def __post_init__(self) -> None:
        if int(self.block) < 1:
            raise ValueError(f"power: block must be >= 1, got {self.block}")

    def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
        q, k = _as_pos(q_pos), _as_pos(k_pos)
        d = q[:, None] // self.block - k[None, :] // self.block  # [Sq, Sk] block distance
        pow2 = (d > 0) & ((d & (d - 1)) == 0)
        return ((k[None, :] <= q[:, None]) & ((d == 0) | pow2))[None]

    def _classify_ranges(self, qmin, qmax, kmin, kmax, *, heads, num_heads, seq_len):
        b = self.block
        dmin = qmin // b - kmax // b  # [nQ, nK] smallest block distance in the tile
        dmax = qmax // b - kmin // b
        lo = dmin.clamp(min=0)
        # some d in [lo, dmax] is 0 or a power of two
        hit = (dmax >= 0) & ((lo == 0) | (_floor_pow2(dmax) >= lo))
        empty = (qmax < kmin) | ~hit
        single = dmin == dmax
        pow2 = (dmin > 0) & ((dmin & (dmin - 1)) == 0)
        full = single & (pow2 | ((dmin == 0) & (qmin >= kmax)))
        return _where3(empty, full)[None]

    def regions(self, head, num_heads, seq_len):
        b, nb = self.block, -(-seq_len // self.block)
        out = []
        for a in range(nb):
            q0, q1 = a * b, min(seq_len, (a + 1) * b)
            out.append(Region(q0, q1, q0, q1, 0, INF))  # own block, token-causal
            dist = 1
            while dist <= a:
                out.append(Region(q0, q1, (a - dist) * b, (a - dist + 1) * b))
                dist *= 2
        return out


def power(block: int) -> Mask:
    """PowerAttention with blocks of ``block`` tokens: key block j visible to query block i iff i−j ∈ {0} ∪ {2^k} (causal)."""
    return _Power(int(block))


# --------------------------------------------------------------------------------------------
# LongLoRA S2-Attn
# --------------------------------------------------------------------------------------------


def _group_classify(qmin, qmax, kmin, kmax, gid):
    """Causal-inside-groups classification for a monotone group id function ``gid``."""
    gq0, gq1, gk0, gk1 = gid(qmin), gid(qmax), gid(kmin), gid(kmax)
    empty = (qmax < kmin) | (gk1 < gq0) | (gk0 > gq1)
    full = (gq0 == gq1) & (gk0 == gk1) & (gq0 == gk0) & (qmin >= kmax)
    return _where3(empty, full)


@dataclass(frozen=True)
class _S2(Mask):
    """LongLoRA shifted sparse attention; see the module docstring for both variants."""

    group_size: int
    variant: str = "varlen"
    per_head = True

    def __post_init__(self) -> None:
        g = int(self.group_size)
        if g < 2 or g % 2:
            raise ValueError(f"s2: group_size must be an even integer >= 2, got {self.group_size}")
        if self.variant not in ("varlen", "roll"):
            raise ValueError(f"s2: variant must be 'varlen' or 'roll', got {self.variant!r}")

    @property
    def is_causal(self) -> bool:  # type: ignore[override]
        return self.variant == "varlen"

    def _seq_len(self, seq_len: int | None, q: torch.Tensor, k: torch.Tensor) -> int:
        if seq_len is None:
            seq_len = 1 + max(int(q.max()) if q.numel() else 0, int(k.max()) if k.numel() else 0)
        if self.variant == "roll" and seq_len % self.group_size:
            raise ValueError(
                f"s2(variant='roll'): sequence length {seq_len} must be a multiple of group_size {self.group_size}"
            )
        return int(seq_len)

    def _shifted(self, heads: torch.Tensor | None, num_heads: int) -> torch.Tensor:
        return _heads_of(heads, num_heads) >= num_heads // 2  # [Hm] bool

    def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
        q, k = _as_pos(q_pos), _as_pos(k_pos)
        g, half = self.group_size, self.group_size // 2
        causal = k[None, :] <= q[:, None]  # [Sq, Sk]
        plain = causal & (q[:, None] // g == k[None, :] // g)
        if self.variant == "varlen":
            shifted = causal & ((q[:, None] + half) // g == (k[None, :] + half) // g)
        else:
            n = self._seq_len(seq_len, q, k)
            rq, rk = (q - half) % n, (k - half) % n
            shifted = (rq[:, None] // g == rk[None, :] // g) & (rk[None, :] <= rq[:, None])
        sh = self._shifted(heads, num_heads)[:, None, None]  # [Hm, 1, 1]
        return torch.where(sh, shifted[None], plain[None])  # [Hm, Sq, Sk]

    def _classify_ranges(self, qmin, qmax, kmin, kmax, *, heads, num_heads, seq_len):
        g, half = self.group_size, self.group_size // 2
        plain = _group_classify(qmin, qmax, kmin, kmax, lambda p: p // g)
        if self.variant == "varlen":
            shifted = _group_classify(qmin, qmax, kmin, kmax, lambda p: (p + half) // g)
        else:
            n = int(seq_len)
            if n % g:
                raise ValueError(f"s2(variant='roll'): sequence length {n} must be a multiple of group_size {g}")

            # r(p) = (p - G/2) mod N is monotone on [0, G/2) and on [G/2, N); a range straddling
            # G/2 maps to the whole sequence (conservatively PARTIAL).
            def rng(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                straddle = (lo < half) & (hi >= half)
                rlo = torch.where(straddle, torch.zeros_like(lo), (lo - half) % n)
                rhi = torch.where(straddle, torch.full_like(hi, n - 1), (hi - half) % n)
                return rlo, rhi

            rq0, rq1 = rng(qmin, qmax)
            rk0, rk1 = rng(kmin, kmax)
            shifted = _group_classify(rq0, rq1, rk0, rk1, lambda p: p // g)
        sh = self._shifted(heads, num_heads)[:, None, None]
        return torch.where(sh, shifted[None], plain[None]).to(torch.int8)

    def regions(self, head, num_heads, seq_len):
        g, half, n = self.group_size, self.group_size // 2, int(seq_len)
        if head < num_heads // 2:
            starts = range(0, n, g)
        elif self.variant == "varlen":
            starts = [0, *range(half, n, g)]
        else:
            self._seq_len(n, torch.zeros(0), torch.zeros(0))  # raises when N % G != 0
            # rolled groups [mG + G/2, (m+1)G + G/2); the last one wraps: [N − G/2, N) then [0, G/2)
            out = [Region(a, a + g, a, a + g, 0, INF) for a in range(half, n - half, g)]
            return out + [Region(n - half, n, n - half, n, 0, INF), Region(0, half, n - half, n),
                          Region(0, half, 0, half, 0, INF)]
        bounds = [*starts, n]
        return [Region(a, min(b, n), a, min(b, n), 0, INF) for a, b in zip(bounds[:-1], bounds[1:]) if a < n]


def s2(group_size: int, variant: str = "varlen") -> Mask:
    """LongLoRA S2-Attn with groups of ``group_size`` tokens; ``variant`` "varlen" (causal) or "roll"."""
    return _S2(int(group_size), variant)


# --------------------------------------------------------------------------------------------
# SinkLoRA SF-Attn
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _SF(_Or):
    """SF-Attn = S2 varlen groups (no wrap-around) | causal global sinks; see the module docstring."""

    group_size: int = 0
    sinks: int = 4


def sf(group_size: int, sinks: int = 4) -> Mask:
    """SinkLoRA SF-Attn: shifted groups returned to their positions (no wrap) plus ``sinks`` sink tokens."""
    if int(sinks) < 0:
        raise ValueError(f"sf: sinks must be >= 0, got {sinks}")
    return _SF(_S2(int(group_size), "varlen"), _Sinks(int(sinks)), group_size=int(group_size), sinks=int(sinks))


# --------------------------------------------------------------------------------------------
# SSA: stochastically subsampled attention
# --------------------------------------------------------------------------------------------


def _i64(c: int) -> int:
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic); same bits on every machine."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _uniform(seed: int, step: int, layer: int, head: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float64 from a hash of (seed, step, layer, head, query block, key block)."""
    h = torch.tensor(int(seed) & ((1 << 63) - 1), dtype=torch.int64)
    for part in (int(step), int(layer)):
        h = splitmix64(h ^ torch.tensor(_i64(part & ((1 << 64) - 1)), dtype=torch.int64))
    h = splitmix64(h ^ head.to(torch.int64))  # broadcast over the inputs' shapes
    h = splitmix64(h ^ qb.to(torch.int64))
    h = splitmix64(h ^ kb.to(torch.int64))
    return _shr(h, 11).to(torch.float64) * (1.0 / (1 << 53))


def ssa_keep_probability(ratio: float, *, window: int, num_blocks: int, bias: str) -> torch.Tensor:
    """Keep probability per block distance d = 0..num_blocks-1 (float64 ``[num_blocks]``).

    Calibrated so that the expected kept fraction of causal block pairs (window included) is
    ``ratio`` (or the window's own fraction when that is larger).
    """
    return _keep_probability(float(ratio), int(window), int(num_blocks), str(bias)).clone()


@lru_cache(maxsize=64)
def _keep_probability(ratio: float, window: int, num_blocks: int, bias: str) -> torch.Tensor:
    nb = int(num_blocks)
    d = torch.arange(nb, dtype=torch.float64)
    count = nb - d  # number of (a, b) pairs at distance d
    in_win = d < window
    p = torch.ones(nb, dtype=torch.float64)
    if ratio >= 1.0 or bool(in_win.all()):
        return p
    total = float(count.sum())
    need = ratio * total - float(count[in_win].sum())
    if need <= 0:
        return torch.where(in_win, p, torch.zeros_like(p))
    if bias == "uniform":
        c = need / float(count[~in_win].sum())
        return torch.where(in_win, p, torch.full_like(p, min(1.0, c)))
    shape = 1.0 / (d - window + 1.0).clamp(min=1.0)  # decays with the distance past the window

    def kept(c: float) -> float:
        return float((count[~in_win] * (c * shape[~in_win]).clamp(max=1.0)).sum())

    lo, hi = 0.0, 1.0
    while kept(hi) < need and hi < 1e18:
        hi *= 2.0
    for _ in range(80):  # bisection in float64: deterministic on every rank
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kept(mid) < need else (lo, mid)
    return torch.where(in_win, p, (hi * shape).clamp(max=1.0))


@dataclass(frozen=True)
class _SSA(Mask):
    """Stochastically subsampled attention (Information Pathways); see the module docstring."""

    ratio: float
    window: int
    block: int
    seed: int
    bias: str = "local"
    step: int = 0
    layer: int = 0
    is_causal = True
    per_head = True

    def __post_init__(self) -> None:
        if not (0.0 < float(self.ratio) <= 1.0):
            raise ValueError(f"ssa: ratio must be in (0, 1], got {self.ratio}")
        if int(self.window) < 1:
            raise ValueError(f"ssa: window must be >= 1 block, got {self.window}")
        if int(self.block) < 1:
            raise ValueError(f"ssa: block must be >= 1 token, got {self.block}")
        if self.bias not in ("local", "uniform"):
            raise ValueError(f"ssa: bias must be 'local' or 'uniform', got {self.bias!r}")

    def at(self, *, step: int = 0, layer: int = 0) -> Mask:
        return replace(self, step=int(step), layer=int(layer))

    def block_keep(self, qb: torch.Tensor, kb: torch.Tensor, heads: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Kept block pairs ``bool [Hm, len(qb), len(kb)]`` (causal at block level, window included)."""
        qb, kb = _as_pos(qb), _as_pos(kb)
        d = qb[:, None] - kb[None, :]  # [nq, nk]
        if self.ratio >= 1.0:
            return (d >= 0)[None].expand(heads.numel(), -1, -1)
        p = _keep_probability(float(self.ratio), int(self.window), int(num_blocks), self.bias)
        pd = p[d.clamp(0, num_blocks - 1)]  # [nq, nk]
        u = _uniform(self.seed, self.step, self.layer, heads[:, None, None], qb[None, :, None], kb[None, None, :])
        keep = (d < self.window) | (u < pd)
        return (d >= 0) & keep  # [Hm, nq, nk]

    def _num_blocks(self, seq_len: int | None, q: torch.Tensor, k: torch.Tensor) -> int:
        if seq_len is None:
            seq_len = 1 + max(int(q.max()) if q.numel() else 0, int(k.max()) if k.numel() else 0)
        return max(1, -(-int(seq_len) // self.block))

    def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
        q, k = _as_pos(q_pos), _as_pos(k_pos)
        heads = _heads_of(heads, num_heads)
        if q.numel() == 0 or k.numel() == 0:
            return torch.zeros(heads.numel(), q.numel(), k.numel(), dtype=torch.bool)
        nb = self._num_blocks(seq_len, q, k)
        qb, kb = q // self.block, k // self.block
        uq, iq = torch.unique(qb, return_inverse=True)
        uk, ik = torch.unique(kb, return_inverse=True)
        keep = self.block_keep(uq, uk, heads, nb)  # [Hm, nuq, nuk]
        tok = keep[:, iq][:, :, ik]  # [Hm, Sq, Sk]
        return tok & (k[None, None, :] <= q[None, :, None])

    def _classify_ranges(self, qmin, qmax, kmin, kmax, *, heads, num_heads, seq_len):
        b = self.block
        heads = _heads_of(heads, num_heads)
        nb = max(1, -(-int(seq_len) // b))
        qb0, qb1 = qmin // b, qmax // b  # [nQ, 1]
        kb0, kb1 = kmin // b, kmax // b  # [1, nK]
        lo_q, hi_q = int(qb0.min()), int(qb1.max())
        lo_k, hi_k = int(kb0.min()), int(kb1.max())
        keep = self.block_keep(torch.arange(lo_q, hi_q + 1), torch.arange(lo_k, hi_k + 1), heads, nb)
        # summed-area table over kept block pairs: any / all kept inside each tile's block rectangle
        sat = torch.zeros(keep.shape[0], keep.shape[1] + 1, keep.shape[2] + 1, dtype=torch.int64)
        sat[:, 1:, 1:] = keep.to(torch.int64).cumsum(1).cumsum(2)
        a0, a1 = (qb0 - lo_q).reshape(-1), (qb1 - lo_q + 1).reshape(-1)
        c0, c1 = (kb0 - lo_k).reshape(-1), (kb1 - lo_k + 1).reshape(-1)
        kept = (sat[:, a1][:, :, c1] - sat[:, a0][:, :, c1] - sat[:, a1][:, :, c0] + sat[:, a0][:, :, c0])
        area = (qb1 - qb0 + 1) * (kb1 - kb0 + 1)  # [nQ, nK]
        empty = (kept == 0) | (qmax < kmin)[None]
        all_kept = kept == area[None]
        full = all_kept & ((qb0 > kb1) | ((qb0 == qb1) & (qb0 == kb0) & (kb0 == kb1) & (qmin >= kmax)))[None]
        return _where3(empty, full)

    def regions(self, head, num_heads, seq_len):
        b, nb = self.block, self._num_blocks(seq_len, torch.zeros(0), torch.zeros(0))
        blocks = torch.arange(nb)
        keep = self.block_keep(blocks, blocks, torch.tensor([head]), nb)[0]  # [nb, nb]
        out = []
        for a, c in keep.nonzero().tolist():
            q0, q1, k0 = a * b, min(seq_len, (a + 1) * b), c * b
            out.append(Region(q0, q1, k0, min(seq_len, k0 + b), 0 if a == c else -INF, INF))
        return out


def ssa(ratio: float, *, window: int, block: int, seed: int, bias: str = "local") -> Mask:
    """Stochastically subsampled attention; bind the training step and layer with ``.at(step=, layer=)``."""
    return _SSA(float(ratio), int(window), int(block), int(seed), bias)

