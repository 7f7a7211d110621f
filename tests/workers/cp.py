"""Rank workers of the context-parallel tests (tests/test_cp.py, tests/test_mesh.py).

Each worker runs a whole matrix inside one process group, so one spawn per world size covers every case,
and returns what each rank computed (local outputs, LSE and gradients with their global positions;
counters); the test reassembles them and compares with the float64 single-rank reference
(:func:`case_mismatches`, ``torch.testing.assert_close``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longreach.bench.cp_ranks import AllToAllBytes
from longreach.kernels import get_backend
from longreach.kernels import masks as M
from longreach.parallel import (
    DocumentZigzag,
    cp_attention,
    shard_documents,
    shard_sequence,
    unshard_documents,
    unshard_sequence,
)
from longreach.parallel.comm import CommRecorder, WorkCounter
from longreach.parallel.cp import layout_positions

LAYOUTS = ("contiguous", "zigzag", "stripe")
STRATEGIES = ("ring", "ulysses", "hybrid", "allgather")


class Lagged(M.Mask):
    """Key j visible to query i iff j ≤ i − lag: the first ``lag`` queries have no key at all."""

    is_causal = True

    def __init__(self, lag: int) -> None:
        self.lag = lag

    def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
        q, k = torch.as_tensor(q_pos).reshape(-1), torch.as_tensor(k_pos).reshape(-1)
        return (k[None, :] <= q[:, None] - self.lag)[None]


class HeadStripes(M.Mask):
    """Per-head mask (even heads causal, odd heads a causal window of 3): checks head bookkeeping."""

    is_causal = True
    per_head = True

    def dense(self, q_pos, k_pos, *, heads=None, num_heads=1, seq_len=None):
        q, k = torch.as_tensor(q_pos).reshape(-1), torch.as_tensor(k_pos).reshape(-1)
        heads = torch.arange(num_heads) if heads is None else torch.as_tensor(heads).reshape(-1)
        diff = q[:, None] - k[None, :]
        causal = diff >= 0
        window = causal & (diff < 3)
        return torch.where((heads % 2 == 0)[:, None, None], causal[None], window[None])


def _shard_positions(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    return x.index_select(dim, pos.to(x.device)).contiguous()


@dataclass
class Case:
    strategy: str
    layout: object
    causal: bool = True
    heads: int = 4
    kv_heads: int = 4
    dtype: torch.dtype = torch.float64
    mask: M.Mask | None = None
    ulysses_degree: int | None = None
    batch: int = 1
    head_dim: int = 12
    name: str = ""


GRADS = ("dq", "dk", "dv")
"""Gradients each case returns beside ``out`` and ``lse``."""


def case_inputs(case: Case, seq_len: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded float64 ``q [B, S, H, D], k, v [B, S, Hkv, D], dout [B, S, H, D]`` of a case (the same on every
    rank and in the test process)."""
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, d = case.batch, case.heads, case.kv_heads, case.head_dim
    q = torch.randn(b, seq_len, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, seq_len, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, seq_len, hkv, d, generator=g, dtype=torch.float64)
    do = torch.randn(b, seq_len, h, d, generator=g, dtype=torch.float64)
    return q, k, v, do


def run_case(rank: int, world: int, case: Case, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """cp_attention forward + backward of this rank's shard of a case.

    Returns:
        ``{"pos": [S/P] global positions, "out" [B, S/P, H, D], "lse" [B, H, S/P], "dq", "dk", "dv"}``
        in the case's dtype, detached.
    """
    q, k, v, do = case_inputs(case, seq_len, seed)
    pos = layout_positions(case.layout, seq_len, rank, world)
    ql, kl, vl, dol = (_shard_positions(t, pos, 1).to(case.dtype) for t in (q, k, v, do))
    for t in (ql, kl, vl):
        t.requires_grad_(True)
    out, lse = cp_attention(ql, kl, vl, strategy=case.strategy, layout=case.layout, causal=case.causal,
                            mask=case.mask, ulysses_degree=case.ulysses_degree, return_lse=True)
    out.backward(dol)
    return {"pos": pos, "out": out.detach(), "lse": lse.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}


def reference(case: Case, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """The float64 single-rank reference of a case over the whole sequence: out, lse, dq, dk, dv."""
    q, k, v, do = case_inputs(case, seq_len, seed)
    ref = get_backend("reference")
    eff = case.mask
    if eff is None:
        eff = M.causal() if case.causal else M.full()
    elif case.causal and not eff.is_causal:
        eff = eff & M.causal()
    allpos = torch.arange(seq_len)
    placed = eff.place(allpos, allpos, seq_len=seq_len, num_heads=case.heads)
    out, lse = ref.forward(q, k, v, mask=placed)
    dq, dk, dv = ref.backward(do, q, k, v, out, lse, mask=placed)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def unshard(per_rank: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """One tensor of every rank's :func:`run_case` result put back at its global positions (float64)."""
    dim = 2 if name == "lse" else 1
    parts = [r[name].double() for r in per_rank]
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    full = torch.full(shape, float("nan"), dtype=torch.float64)  # a position no rank filled stays NaN
    for r, part in zip(per_rank, parts):
        full.index_copy_(dim, r["pos"], part)
    return full


def case_mismatches(case: Case, seq_len: int, seed: int, per_rank: list[dict[str, torch.Tensor]]) -> list[str]:
    """Compare every rank's result of a case, reassembled, with :func:`reference` (test-process side).

    Each of out, lse, dq, dk, dv must be within ``tol × max |reference|`` of it everywhere (tol 1e-9 in
    float64, 2e-4 in float32; −inf LSE rows of fully masked queries must match exactly), in the case's
    dtype. Returns ``torch.testing.assert_close``'s message for each tensor that is not (empty: all match).
    """
    want = reference(case, seq_len, seed)
    tol = 1e-9 if case.dtype == torch.float64 else 2e-4
    bad = []
    for name in ("out", "lse", *GRADS):
        dtypes = {r[name].dtype for r in per_rank}
        if dtypes != {case.dtype}:
            bad.append(f"{case.name} {name}: dtype {dtypes}, want {case.dtype}")
            continue
        ref = want[name]
        finite = ref[torch.isfinite(ref)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        try:
            torch.testing.assert_close(unshard(per_rank, name), ref, rtol=0, atol=tol * max(scale, 1e-12),
                                       msg=lambda m, n=name: f"P={len(per_rank)} {case.name} {n}: {m}")
        except AssertionError as e:
            bad.append(str(e))
    return bad


def _heads_for(world: int) -> list[tuple[str, int, int]]:
    h = 6 if world == 3 else 4
    return [("MHA", h, h), ("GQA", h, h // 2 if world != 3 else 3), ("MQA", h, 1)]


def _degree(strategy: str, world: int) -> int | None:
    if strategy != "hybrid":
        return None
    return 2 if world % 2 == 0 and world > 2 else world


def matrix_cases(world: int, seq_len: int) -> list[Case]:
    """The whole correctness matrix of one world size; case ``i`` runs with seed ``i + 1``."""
    cases: list[Case] = []
    # every strategy × layout × causal × MHA/GQA/MQA, float64
    for strategy in STRATEGIES:
        for layout in LAYOUTS:
            for causal in (True, False):
                for hname, h, hkv in _heads_for(world):
                    cases.append(Case(strategy=strategy, layout=layout, causal=causal, heads=h, kv_heads=hkv,
                                      ulysses_degree=_degree(strategy, world),
                                      name=f"{strategy}/{layout}/{'causal' if causal else 'full'}/{hname}/f64"))
    # float32 with a looser tolerance, batch 2
    for strategy in STRATEGIES:
        for layout in LAYOUTS:
            hname, h, hkv = _heads_for(world)[1]
            cases.append(Case(strategy=strategy, layout=layout, heads=h, kv_heads=hkv, dtype=torch.float32, batch=2,
                              ulysses_degree=_degree(strategy, world), name=f"{strategy}/{layout}/causal/{hname}/f32/B2"))
    # masks over global positions, and a fully masked query chunk
    cu = [0, 7, 8, seq_len // 2 + 1, seq_len]
    masks = {
        "sliding_window(7)": M.sliding_window(7),
        "documents": M.documents(cu),
        "sinks(3)": M.sinks(3),
        "sinks(2)|window(4)": M.sinks(2) | M.sliding_window(4),
        "lagged(no keys for first chunk)": Lagged(seq_len // world + 1),
        "per-head": HeadStripes(),
    }
    for strategy in STRATEGIES:
        for mname, mask in masks.items():
            for layout in ("zigzag", "contiguous") if mname in ("documents", "lagged(no keys for first chunk)") \
                    else ("zigzag",):
                hname, h, hkv = _heads_for(world)[1]
                cases.append(Case(strategy=strategy, layout=layout, heads=h, kv_heads=hkv, mask=mask,
                                  ulysses_degree=_degree(strategy, world), name=f"{strategy}/{layout}/{mname}/{hname}"))
    # per-document zigzag for packed documents
    doc_lens = [2 * world, 4 * world, 2 * world, seq_len - 8 * world]
    cu_doc = [0]
    for n in doc_lens:
        cu_doc.append(cu_doc[-1] + n)
    if doc_lens[-1] > 0 and doc_lens[-1] % (2 * world) == 0:
        doc_layout = DocumentZigzag(cu_doc)
        for strategy in STRATEGIES:
            hname, h, hkv = _heads_for(world)[2]
            cases.append(Case(strategy=strategy, layout=doc_layout, heads=h, kv_heads=hkv, mask=M.documents(cu_doc),
                              ulysses_degree=_degree(strategy, world), name=f"{strategy}/doc_zigzag/documents/{hname}"))
    return cases


def matrix_worker(rank: int, world: int, seq_len: int) -> dict:
    """Every case of :func:`matrix_cases` on this rank: ``{"results": [run_case result, or the error a case
    raised, per case], "counters": counters_worker(...)}``."""
    results: list[dict[str, torch.Tensor] | str] = []
    for i, case in enumerate(matrix_cases(world, seq_len)):
        try:
            results.append(run_case(rank, world, case, seq_len, i + 1))
        except Exception as e:  # noqa: BLE001 - report every failing case, keep going
            if "timed out" in str(e) or isinstance(e, RuntimeError) and "gloo" in str(e).lower():
                raise
            results.append(f"P={world} rank={rank} {case.name}: raised {type(e).__name__}: {e}")
    return {"results": results, "counters": counters_worker(rank, world, seq_len)}


def suite_worker(rank: int, world: int, seq_len: int, extras: tuple[str, ...] = ()) -> dict:
    """Everything one world size checks, in one process group: the matrix, counters, layout round
    trips, and (``"errors"`` in extras) the bad-input errors."""
    res = matrix_worker(rank, world, seq_len)
    x = torch.arange(2 * seq_len * 3, dtype=torch.float64).view(2, seq_len, 3)
    trips = {}
    for layout in LAYOUTS:
        trips[layout] = bool(torch.equal(unshard_sequence(shard_sequence(x, layout=layout), layout=layout), x))
    cu = [0, 2 * world, 6 * world, seq_len]
    trips["documents"] = bool(torch.equal(unshard_documents(shard_documents(x, cu), cu), x))
    res["roundtrips"] = trips
    if "errors" in extras:
        res["errors"] = error_worker(rank, world)
    res["p2p_order"] = order_worker(rank, world, 4 * world)
    if "memory" in extras:
        res["memory"] = memory_worker(rank, world, (512, 1024))
    if "memory_hybrid" in extras:
        res["memory"] = memory_worker(rank, world, (512, 1024), ("hybrid", "ring"))
    return res


def counters_worker(rank: int, world: int, seq_len: int) -> dict:
    """Bytes and work of forward passes (no lse returned), for the recorder/counter assertions."""
    res: dict = {}
    g = torch.Generator().manual_seed(123)
    h, hkv, d = (6, 3, 12) if world == 3 else (4, 2, 12)
    q = torch.randn(1, seq_len, h, d, generator=g)
    k = torch.randn(1, seq_len, hkv, d, generator=g)
    v = torch.randn(1, seq_len, hkv, d, generator=g)
    for strategy in ("ring", "ulysses", "allgather"):
        for layout in LAYOUTS:
            ql, kl, vl = (shard_sequence(t, layout=layout) for t in (q, k, v))
            with CommRecorder() as rec, WorkCounter(exact=True) as work:
                out = cp_attention(ql, kl, vl, strategy=strategy, layout=layout, causal=True)
            res[(strategy, layout)] = {
                "sent": dict(rec.sent), "calls": dict(rec.calls), "computed": work.computed.get("fwd", 0),
                "allowed": work.allowed.get("fwd", 0),
                "q_bytes": ql.numel() * ql.element_size(), "kv_bytes": 2 * kl.numel() * kl.element_size(),
                "out_bytes": out.numel() * out.element_size(),
            }
    # non-causal ring: every chunk must go all the way round
    ql, kl, vl = (shard_sequence(t, layout="contiguous") for t in (q, k, v))
    with CommRecorder() as rec:
        cp_attention(ql, kl, vl, strategy="ring", layout="contiguous", causal=False)
    res[("ring", "contiguous", "full")] = {"sent": dict(rec.sent), "kv_bytes": 2 * kl.numel() * kl.element_size()}
    # all-to-alls of a training pass (forward + backward), Ulysses and (even worlds) hybrid
    for strategy, degree in (("ulysses", None), ("hybrid", 2)):
        if strategy == "hybrid" and (world % 2 or world == 2):
            continue
        ql, kl, vl = (shard_sequence(t, layout="zigzag").requires_grad_(True) for t in (q, k, v))
        with CommRecorder() as rec:
            cp_attention(ql, kl, vl, strategy=strategy, layout="zigzag", ulysses_degree=degree).sum().backward()
        res[(strategy, "pass")] = {"calls": dict(rec.calls)}
    return res


def error_worker(rank: int, world: int) -> dict:
    """Bad combinations: each must raise (the same message on every rank) before any communication."""
    msgs: dict[str, str] = {}

    def t(shape_q, shape_kv):
        return torch.zeros(shape_q), torch.zeros(shape_kv), torch.zeros(shape_kv)

    n = 6
    cases = {
        "heads": (t((1, n, world + 1, 8), (1, n, world + 1, 8)), dict(strategy="ulysses", layout="zigzag")),
        "kv_heads": (t((1, n, 6, 8), (1, n, 2, 8)), dict(strategy="ulysses", layout="contiguous")),
        "seq": (t((1, 5, 4, 8), (1, 5, 4, 8)), dict(strategy="ring", layout="zigzag")),
        "layout": (t((1, n, 4, 8), (1, n, 4, 8)), dict(strategy="ring", layout="diagonal")),
        "strategy": (t((1, n, 4, 8), (1, n, 4, 8)), dict(strategy="spiral", layout="zigzag")),
        "degree": (t((1, n, 4, 8), (1, n, 4, 8)), dict(strategy="hybrid", layout="zigzag", ulysses_degree=world + 1)),
        "degree_ring": (t((1, n, 4, 8), (1, n, 4, 8)), dict(strategy="ring", layout="zigzag", ulysses_degree=2)),
        "shapes": ((torch.zeros(1, n, 4, 8), torch.zeros(1, n + 1, 4, 8), torch.zeros(1, n + 1, 4, 8)),
                   dict(strategy="allgather", layout="contiguous")),
    }
    for name, ((q, k, v), kw) in cases.items():
        try:
            cp_attention(q, k, v, **kw)
            msgs[name] = "NO ERROR"
        except (ValueError, TypeError) as e:
            msgs[name] = str(e)
    # the group still works afterwards: nobody is stuck in a collective
    x = torch.ones(1)
    dist.all_reduce(x)
    msgs["after"] = str(int(x.item()))
    return msgs


def mesh_worker(rank: int, world: int) -> dict:
    """Build meshes on gloo and report the groups this rank sees."""
    from longreach.parallel.mesh import ParallelDims

    out: dict = {}
    dims = ParallelDims(dp=-1, cp=2, world_size=world)
    mesh = dims.build_mesh("cpu")
    out["plain"] = {n: ParallelDims.ranks(mesh, n) for n in ("dp", "cp")}
    hdims = ParallelDims(dp=1, cp=world, world_size=world, ulysses_degree=2)
    hmesh = hdims.build_mesh("cpu")
    out["hybrid"] = {n: ParallelDims.ranks(hmesh, n) for n in ("dp", "cp", "cp_ring", "cp_ulysses")}
    # hybrid attention over the mesh's cp group (the test compares it with the reference)
    out["hybrid_attention"] = run_case(rank, world, MESH_CASE, 8 * world, 7)
    return out


MESH_CASE = Case(strategy="hybrid", layout="zigzag", heads=4, kv_heads=2, ulysses_degree=2, name="hybrid on mesh")
"""The case :func:`mesh_worker` runs on the mesh's groups (sequence 8·P, seed 7)."""


# ------------------------------------------------------------------------------------------------
# point-to-point order and per-rank memory
# ------------------------------------------------------------------------------------------------


def order_worker(rank: int, world: int, seq_len: int) -> list[list[tuple[str, int, int, int]]]:
    """Ring forward + backward in bf16 (K/V messages and float32 dK/dV messages differ in size) under
    layouts and masks that give sources routes of different lengths; returns, per case, every
    point-to-point op this rank posted, in order."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, seq_len, 2, 8, generator=g) for _ in range(3))
    cases = [("contiguous", None), ("zigzag", None), ("stripe", None), ("zigzag", Lagged(seq_len // world + 1)),
             ("contiguous", M.sliding_window(seq_len // world // 2 + 1))]
    logs = []
    for layout, mask in cases:
        ql, kl, vl = (shard_sequence(t, layout=layout).bfloat16().requires_grad_(True) for t in (q, k, v))
        with CommRecorder() as rec:
            out = cp_attention(ql, kl, vl, strategy="ring", layout=layout, mask=mask)
            out.float().sum().backward()
        logs.append(list(rec.p2p_ops))
    return logs


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op outputs while active (elements, and the op)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def memory_worker(rank: int, world: int, lengths: tuple[int, ...], strategies: tuple[str, ...] = STRATEGIES) -> dict:
    """Largest tensor allocated during one cp_attention forward + backward (plans included), per
    (strategy, mask, sequence length): what O(S/P) memory is checked against."""
    res: dict = {}
    h, hkv, d = 4, 2, 8
    for seq_len in lengths:
        cu = [0, seq_len // 8 + 3, seq_len // 2 - 5, 3 * seq_len // 4 + 1, seq_len]
        masks = {"documents": M.documents(cu), "window": M.sliding_window(seq_len // 16 + 3), "causal": None}
        g = torch.Generator().manual_seed(seq_len)
        n = seq_len // world
        for strategy in strategies:
            for mname, mask in masks.items():
                q = torch.randn(1, n, h, d, generator=g, requires_grad=True)
                k, v = (torch.randn(1, n, hkv, d, generator=g, requires_grad=True) for _ in range(2))
                saved: list[tuple[int, int]] = []  # (data_ptr, bytes) of every tensor kept for the backward

                def pack(t: torch.Tensor) -> torch.Tensor:
                    saved.append((t.data_ptr(), t.numel() * t.element_size()))
                    return t

                with LargestTensor() as big, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = cp_attention(q, k, v, strategy=strategy, layout="zigzag", mask=mask,
                                       ulysses_degree=_degree(strategy, world))
                    out.backward(torch.ones_like(out))
                # beyond the output, which the caller's output projection keeps anyway (q, k and v are held by
                # nothing but the attention after RoPE and the projections, so their copies count)
                held = {out.data_ptr()}
                extra = sum(nb for ptr, nb in dict(saved).items() if ptr not in held)
                res[(strategy, mname, seq_len)] = (big.numel, big.op, extra)
    return res


def alltoall_counts_worker(rank: int, world: int) -> dict[str, tuple[int, int]]:
    """A Ulysses forward counted two ways: by longreach's CommRecorder and by the benchmark's dispatch-mode
    counter (what ``longreach bench cp --deepspeed`` uses on code that calls torch.distributed directly).
    Returns ``{counter: (bytes sent, calls)}``."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 8 * world, 2 * world, 8, generator=g) for _ in range(3))
    ql, kl, vl = (shard_sequence(t, layout="contiguous") for t in (q, k, v))
    with CommRecorder() as rec, AllToAllBytes(world) as mode:
        cp_attention(ql, kl, vl, strategy="ulysses", layout="contiguous")
    return {"recorder": (rec.sent["all_to_all"], rec.calls["all_to_all"]), "dispatch": (mode.sent, mode.calls)}


def alone_worker(rank: int, world: int) -> dict:
    """A Ulysses training pass (batch 1, members in order) with every tensor packed, then with every
    one sent alone (``alone_bytes`` 0: dq/dk/dv, which the kernel leaves token-major, need no copy).
    Returns ``{mode: (all-to-all calls, bytes sent, out, dq, dk, dv)}``."""
    from longreach.parallel.cp import ulysses

    g = torch.Generator().manual_seed(9)
    q, k, v, do = (torch.randn(1, 8 * world, 2 * world, 8, generator=g) for _ in range(4))
    res = {}
    default = ulysses.alone_bytes
    for mode, limit in (("packed", 1 << 62), ("alone", 0)):
        ulysses.alone_bytes = lambda device, limit=limit: limit
        try:
            ql, kl, vl = (shard_sequence(t, layout="contiguous").requires_grad_(True) for t in (q, k, v))
            with CommRecorder() as rec:
                out = cp_attention(ql, kl, vl, strategy="ulysses", layout="contiguous", causal=True)
                out.backward(shard_sequence(do, layout="contiguous"))
        finally:
            ulysses.alone_bytes = default
        res[mode] = (rec.calls["all_to_all"], rec.sent["all_to_all"], out.detach(), ql.grad, kl.grad, vl.grad)
    return res
