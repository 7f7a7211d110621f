"""Every cross-rank call goes through ``longreach.parallel.comm``: the recorder sees expert dispatch,
layout gathers and gradient all-reduces; ``ParallelDims`` hands out the named groups (4 gloo ranks)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longreach.testing import run_ranks

D = 3  # feature width of the dispatched rows
E_LOCAL = 2  # experts per rank


def _send_counts(src: int, world: int) -> torch.Tensor:
    """``[P, E_local]`` rows rank ``src`` sends to each (rank, local expert): uneven, some empty."""
    return torch.tensor([[(src + 2 * p) % 3, (src * p + 1) % 4] for p in range(world)], dtype=torch.int64)


def comm_worker(rank: int, world: int) -> dict[str, Any]:
    from longreach.parallel import CommRecorder, ParallelDims, cp_attention, shard_sequence, unshard_sequence
    from longreach.parallel.comm import all_reduce
    from longreach.parallel.cp import api
    from longreach.parallel.expert import combine_tokens, dispatch_tokens

    out: dict[str, Any] = {}
    # expert dispatch + combine, forward and backward
    counts = _send_counts(rank, world)
    x = torch.randn(int(counts.sum()), D, dtype=torch.float64, requires_grad=True)  # [N_assign, D]
    with CommRecorder() as rec:
        y, plan = dispatch_tokens(x, counts)
        back = combine_tokens(y * 2, plan)  # [N_assign, D]
        back.sum().backward()
    out["expert"] = dict(rec.summary().get("all_to_all", {}))
    out["expert_exact"] = bool(torch.equal(back.detach(), 2 * x.detach()) and torch.equal(x.grad, torch.full_like(x, 2)))

    # layouts: sharding is local, unsharding gathers every rank's part
    full = torch.arange(2 * 8 * world * 3, dtype=torch.float32).view(2, 8 * world, 3)  # [B, S, C]
    local = shard_sequence(full, layout="zigzag")  # [B, S/P, C]
    with CommRecorder() as rec:
        again = unshard_sequence(local, layout="zigzag")
    out["layout"] = dict(rec.summary().get("all_gather", {}))
    out["layout_exact"] = bool(torch.equal(again, full))
    out["local_bytes"] = local.numel() * local.element_size()

    # an all-reduce (expert gradients, clipping norms use this one)
    t = torch.full((5,), float(rank + 1), dtype=torch.float64)
    with CommRecorder() as rec:
        all_reduce(t, group=None)
    out["all_reduce"] = dict(rec.summary().get("all_reduce", {}))
    out["all_reduce_exact"] = bool(torch.equal(t, torch.full((5,), float(world * (world + 1) // 2), dtype=torch.float64)))

    # named groups of a hybrid mesh, and cp_attention on the mesh's own Ulysses group
    mesh = ParallelDims(world_size=world, dp=1, cp=world, ulysses_degree=2).build_mesh("cpu")
    out["groups"] = {name: (None if g is None else sorted(dist.get_process_group_ranks(g)))
                     for name in ("dp", "cp", "cp_ring", "cp_ulysses", "ep", "dp_cp")
                     for g in [ParallelDims.get_group(mesh, name)]}
    out["groups"]["dp_cp"] = "WORLD" if ParallelDims.get_group(mesh, "dp_cp") is dist.group.WORLD else "other"
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8 * world, 4, 8, dtype=torch.float64) for _ in range(3))  # [B, S, H, D]
    ql, kl, vl = (shard_sequence(t, layout="zigzag") for t in (q, k, v))
    before = dict(api._CREATED_ULYSSES)
    with CommRecorder() as rec:
        on_mesh = cp_attention(ql, kl, vl, strategy="hybrid", layout="zigzag", ulysses_degree=2,
                               group=ParallelDims.cp_groups(mesh))
    out["hybrid_created_groups"] = len(api._CREATED_ULYSSES) - len(before)
    out["hybrid_calls"] = sum(rec.calls.values())
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)  # [B, S, H, D]
    out["hybrid_err"] = float((on_mesh - shard_sequence(ref, layout="zigzag")).abs().max())
    return out


def test_recorder_sees_expert_layout_and_reduce_bytes_and_mesh_groups() -> None:
    world = 4
    res = run_ranks(comm_worker, world, timeout=300)
    counts = [_send_counts(r, world) for r in range(world)]
    row = D * 8  # float64 rows
    for r, got in enumerate(res):
        to_others = sum(int(counts[r][p].sum()) for p in range(world) if p != r)
        from_others = sum(int(counts[p][r].sum()) for p in range(world) if p != r)
        # counts exchange (even, int64) + dispatch and combine, forward and backward (splits swapped)
        want_sent = (world - 1) * E_LOCAL * 8 + 2 * row * (to_others + from_others)
        assert got["expert"] == {"calls": 5, "sent": want_sent, "received": want_sent}, (r, got["expert"], want_sent)
        assert got["expert_exact"], r
        assert got["layout"] == {"calls": 1, "sent": (world - 1) * got["local_bytes"],
                                 "received": (world - 1) * got["local_bytes"]}, (r, got["layout"])
        assert got["layout_exact"], r
        assert got["all_reduce"] == {"calls": 1, "sent": 2 * 5 * 8 * (world - 1) // world,
                                     "received": 2 * 5 * 8 * (world - 1) // world}, (r, got["all_reduce"])
        assert got["all_reduce_exact"], r
        ulysses = [r // 2 * 2, r // 2 * 2 + 1]
        assert got["groups"] == {"dp": None, "cp": [0, 1, 2, 3], "cp_ring": [r % 2, r % 2 + 2], "cp_ulysses": ulysses,
                                 "ep": [0, 1, 2, 3], "dp_cp": "WORLD"}, (r, got["groups"])
        assert got["hybrid_created_groups"] == 0, r  # the mesh's own Ulysses group, no new one
        assert got["hybrid_calls"] > 0 and got["hybrid_err"] < 1e-12, (r, got["hybrid_calls"], got["hybrid_err"])
