"""LASP-1 and LASP-2 on gloo: exact against single-rank lightning attention in output and gradients."""
import pytest
import torch

from longreach.kernels import lightning_attention
from longreach.parallel import linear_cp_attention, shard_sequence
from longreach.parallel.lasp import chunk_owner, local_chunks
from longreach.testing import run_ranks
from longreach.bench.lasp_ranks import each_document_alone
from workers.lasp import lasp_documents_matrix, lasp_matrix


@pytest.mark.parametrize("world_size", [2, 4])
def test_lasp_equals_single_rank(world_size):
    # one spawn per world size runs variants × layouts × dtypes (× sub-groups of 2 at 4 ranks)
    failures = [f for rank_failures in run_ranks(lasp_matrix, world_size) for f in rank_failures]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("variant", ["lasp1", "lasp2"])
def test_one_rank_without_process_group(layout, variant):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 14, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 14, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    decay = torch.tensor([0.3, 0.01], dtype=torch.float64)
    out = linear_cp_attention(q, k, v, decay, variant=variant, layout=layout)
    ref = lightning_attention(q, k, v, decay, backend="naive")
    assert torch.allclose(out, shard_sequence(ref, layout=layout), rtol=1e-12, atol=1e-12)
    g_out = torch.autograd.grad(out.sum(), [q, k, v])
    g_ref = torch.autograd.grad(ref.sum(), [q, k, v])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(g_out, g_ref))


def test_zigzag_chain_order():
    # chunk t's owner: out across the ranks and back (LASP-1's chain under zigzag)
    assert [chunk_owner("zigzag", t, 3) for t in range(6)] == [0, 1, 2, 2, 1, 0]
    assert local_chunks("zigzag", 1, 3) == [1, 4]
    assert [chunk_owner("contiguous", t, 3) for t in range(3)] == [0, 1, 2]


def test_bad_input_raises_before_communication():
    q = torch.zeros(1, 8, 2, 3)
    decay = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="layout='stripe'"):
        linear_cp_attention(q, q, q, decay, layout="stripe")
    with pytest.raises(ValueError, match="variant='lasp3'"):
        linear_cp_attention(q, q, q, decay, variant="lasp3", layout="contiguous")
    with pytest.raises(ValueError, match="decay must be"):
        linear_cp_attention(q, q, q, torch.tensor([0.1]), layout="contiguous")
    with pytest.raises(ValueError, match="does not split into 2"):
        linear_cp_attention(q[:, :7], q[:, :7], q[:, :7], decay, layout="zigzag")


@pytest.mark.parametrize("world_size", [2, 4])
def test_lasp_packed_documents_equal_each_document_alone(world_size):
    # one spawn per world size: lasp1/lasp2 × contiguous/zigzag × three document layouts × float64/float32
    failures = [f for rank_failures in run_ranks(lasp_documents_matrix, world_size) for f in rank_failures]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_packed_documents_one_rank_and_stripe(layout):
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 12, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 12, 2, 4, generator=g, dtype=torch.float64)
    decay = torch.tensor([0.3, 0.01], dtype=torch.float64)
    cu = (torch.tensor([0, 6, 7, 12]), torch.tensor([0, 2]))
    out = linear_cp_attention(q, k, v, decay, layout=layout, cu_seqlens=cu)
    want, _ = each_document_alone(q, k, v, decay, list(cu))
    assert torch.allclose(out, shard_sequence(want, layout=layout), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="layout='stripe'"):
        linear_cp_attention(q, k, v, decay, layout="stripe", cu_seqlens=cu)
