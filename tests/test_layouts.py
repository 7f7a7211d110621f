"""Sequence layouts and the per-document zigzag (single process; multi-rank round trips run in test_cp)."""
from __future__ import annotations

import pytest
import torch

from longreach.parallel import DocumentZigzag, pad_documents, pad_to_layout, shard_sequence
from longreach.parallel.cp.api import chunk_starts, layout_positions
from longreach.parallel.layouts import positions_for


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layouts_partition_the_sequence(layout: str, world: int) -> None:
    s = 12 * world
    pos = [positions_for(s, layout, r, world) for r in range(world)]
    assert torch.equal(torch.sort(torch.cat(pos)).values, torch.arange(s))
    for p in pos:
        assert p.numel() == s // world and bool((p[1:] > p[:-1]).all())
    if layout == "zigzag":
        c = s // (2 * world)
        assert pos[0][:c].tolist() == list(range(c)) and pos[0][c:].tolist() == list(range(s - c, s))
    if layout == "stripe":
        assert bool((pos[-1] % world == world - 1).all())


def test_sequence_length_must_divide() -> None:
    with pytest.raises(ValueError, match="layout='zigzag'"):
        positions_for(10, "zigzag", 0, 3)
    with pytest.raises(ValueError, match="unknown sequence layout"):
        positions_for(12, "spiral", 0, 3)
    x = torch.zeros(1, 10, 2)
    assert pad_to_layout(x, layout="zigzag", world_size=3).shape[1] == 12
    assert torch.equal(shard_sequence(x, layout="stripe"), x)  # one process: the whole sequence


def test_pad_documents_to_multiples_of_2p() -> None:
    x = torch.arange(1, 12).view(1, 11)  # documents of 3, 1 and 7 tokens
    xp, cu = pad_documents(x, [0, 3, 4, 11], world_size=2, value=-100)
    assert cu.tolist() == [0, 4, 8, 16]
    assert xp[0, :4].tolist() == [1, 2, 3, -100] and xp[0, 4:8].tolist() == [4, -100, -100, -100]
    assert xp[0, 8:15].tolist() == list(range(5, 12)) and xp[0, 15].item() == -100
    with pytest.raises(ValueError, match="cu_seqlens ends at 10"):
        pad_documents(x, [0, 10], world_size=2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_document_zigzag(world: int) -> None:
    lens = [2 * world, 6 * world, 4 * world]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    layout = DocumentZigzag(cu)
    pos = [layout.positions(r, world) for r in range(world)]
    assert torch.equal(torch.sort(torch.cat(pos)).values, torch.arange(int(cu[-1])))
    local_cu = layout.local_cu_seqlens(world)
    for r, p in enumerate(pos):
        doc = torch.searchsorted(cu, p, right=True) - 1
        for d, (a, b) in enumerate(zip(local_cu[:-1].tolist(), local_cu[1:].tolist())):
            # the local cu_seqlens delimit each document's local tokens
            assert bool((doc[a:b] == d).all()) and b - a == lens[d] // world
            c = lens[d] // (2 * world)
            start = int(cu[d])
            expect = list(range(start + r * c, start + (r + 1) * c))
            expect += list(range(start + (2 * world - 1 - r) * c, start + (2 * world - r) * c))
            assert p[a:b].tolist() == expect
    assert torch.equal(layout_positions(layout, int(cu[-1]), 0, world), pos[0])


def test_document_zigzag_errors_name_the_layout() -> None:
    with pytest.raises(ValueError, match="document 1 has 3 tokens"):
        DocumentZigzag([0, 4, 7]).positions(0, 2)
    with pytest.raises(ValueError, match="covers 8 tokens"):
        DocumentZigzag([0, 8]).check(12, 2)


def test_chunk_starts() -> None:
    assert chunk_starts("zigzag", 12, 3).nonzero().flatten().tolist() == [0, 2, 4, 6, 8, 10]
    assert chunk_starts("contiguous", 12, 3).nonzero().flatten().tolist() == [0, 4, 8]
    assert not bool(chunk_starts("stripe", 12, 3).any())
    assert chunk_starts(DocumentZigzag([0, 4, 12]), 12, 2).nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 6, 8, 10]
