"""ParallelDims: degrees validated once with actionable errors; one named DeviceMesh on gloo."""
from __future__ import annotations

import pytest

from longreach.parallel.mesh import ParallelDims
from longreach.testing import run_ranks
from workers import cp as W


def test_dp_resolves_from_world_size() -> None:
    d = ParallelDims(dp=-1, cp=4, world_size=8, ulysses_degree=2)
    assert (d.dp, d.cp, d.ring_degree, d.hybrid) == (2, 4, 2, True)
    assert d.dim_names == ("dp", "cp_ring", "cp_ulysses")
    assert ParallelDims(cp=2, world_size=2).dim_names == ("dp", "cp")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(dp=2, cp=3, world_size=8), "dp * cp != WORLD_SIZE (2 * 3 != 8)"),
        (dict(dp=-1, cp=3, world_size=8), "parallel.cp=3 does not divide WORLD_SIZE (8)"),
        (dict(cp=4, world_size=4, ulysses_degree=3), "ulysses_degree=3 must divide parallel.cp=4"),
        (dict(cp=0, world_size=4), "parallel.cp must be >= 1"),
        (dict(dp=0, cp=1, world_size=4), "parallel.dp must be >= 1"),
    ],
)
def test_bad_degrees_name_the_setting(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        ParallelDims(**kwargs)
    assert fragment in str(e.value)


def test_mesh_groups_on_gloo() -> None:
    res = run_ranks(W.mesh_worker, 4, timeout=300)
    for rank, r in enumerate(res):
        # rank = d * cp + c: cp groups are consecutive ranks, dp groups strided
        assert r["plain"]["cp"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert r["plain"]["dp"] == [rank % 2, rank % 2 + 2]
        # hybrid: Ulysses groups of consecutive ranks, ring groups strided
        assert r["hybrid"]["cp"] == [0, 1, 2, 3]
        assert r["hybrid"]["cp_ulysses"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert r["hybrid"]["cp_ring"] == [rank % 2, rank % 2 + 2]
    # hybrid attention over the mesh's cp group: the ranks' shards reassembled equal the reference
    mismatches = W.case_mismatches(W.MESH_CASE, 8 * 4, 7, [r["hybrid_attention"] for r in res])
    assert not mismatches, "\n".join(mismatches)
