"""Packed documents in lightning attention: every backend equals running each document alone (float64 oracle)."""
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU (must be set before triton loads them)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from longreach.kernels import lightning_attention  # noqa: E402
from longreach.kernels.lightning import document_ids  # noqa: E402
from longreach.workers.lasp import each_document_alone  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-300))


def _case(seq_len: int, dtype: torch.dtype, seed: int, b: int = 2, h: int = 3, d: int = 6, e: int = 5):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, seq_len, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, seq_len, h, e, generator=g, dtype=torch.float64)
    s0 = torch.randn(b, h, d, e, generator=g, dtype=torch.float64)
    dout = torch.randn(b, seq_len, h, e, generator=g, dtype=torch.float64)
    dstate = torch.randn(b, h, d, e, generator=g, dtype=torch.float64)
    decay = torch.tensor([0.9, 0.05, 0.002], dtype=torch.float64)[:h]
    return [x.to(dtype) for x in (q, k, v, s0, dout, dstate, decay)]


def _per_document(tensors, cu_rows: list[torch.Tensor], with_state: bool):
    """Oracle: float64 naive lightning on each document of each row alone; S0 enters the first document."""
    q, k, v, s0, dout, dstate, decay = [x.double() for x in tensors]
    leaves = [x.clone().requires_grad_() for x in ((q, k, v, s0) if with_state else (q, k, v))]
    out, state = each_document_alone(*leaves[:3], decay, cu_rows, leaves[3] if with_state else None)
    loss = (out * dout).sum() + (state * dstate).sum()
    return [out, state, *torch.autograd.grad(loss, leaves)]


def _packed(backend: str, tensors, cu, chunk: int | None, with_state: bool):
    q, k, v, s0, dout, dstate, decay = tensors
    leaves = [x.clone().requires_grad_() for x in ((q, k, v, s0) if with_state else (q, k, v))]
    out, state = lightning_attention(*leaves[:3], decay, backend=backend, chunk_size=chunk,
                                     initial_state=leaves[3] if with_state else None, return_state=True,
                                     cu_seqlens=cu)
    loss = (out.double() * dout.double()).sum() + (state.double() * dstate.double()).sum()
    return [out, state, *torch.autograd.grad(loss, leaves)]


NAMES = ["out", "state", "dq", "dk", "dv", "ds0"]


def _compare(backend, seq_len, cu, chunk, dtype, tol, with_state=True) -> list[str]:
    tensors = _case(seq_len, dtype, seed=seq_len + (chunk or 0))
    rows = list(cu) if isinstance(cu, tuple) else [torch.as_tensor(cu)]
    want = _per_document(tensors, rows, with_state)
    got = _packed(backend, tensors, cu, chunk, with_state)
    bad = []
    for name, g, w in zip(NAMES, got, want):
        err = _rel(g, w)
        if not err < tol:
            bad.append(f"{backend} S={seq_len} C={chunk} {dtype} cu={cu} {name}: rel err {err:.2e}")
    return bad


# document layouts over 37 tokens: boundary on a block edge (8, 16), single-token documents (9, 36),
# documents spanning several blocks, a tail after the last offset, and per-row offsets
CU_37 = [
    torch.tensor([0, 8, 9, 16, 30, 36, 37]),
    torch.tensor([0, 3, 29]),  # tokens 29..36 form the tail document
    (torch.tensor([0, 37]), torch.tensor([0, 1, 20, 21, 37])),  # one row unpacked, one packed
]


def test_documents_chunk_and_recurrent_equal_each_document_alone_float64():
    bad = []
    for cu in CU_37:
        for chunk in (8, 5, 64):
            bad += _compare("chunk", 37, cu, chunk, torch.float64, 1e-12)
        bad += _compare("chunk", 37, cu, 8, torch.float64, 1e-12, with_state=False)
        bad += _compare("recurrent", 37, cu, None, torch.float64, 1e-12)
        bad += _compare("naive", 37, cu, None, torch.float64, 1e-12)
    assert not bad, "\n".join(bad)


def test_documents_chunk_float32():
    bad = _compare("chunk", 37, CU_37[0], 8, torch.float32, 2e-6)
    assert not bad, "\n".join(bad)


def test_documents_change_the_result_and_one_document_is_the_plain_call():
    q, k, v, s0, _, _, decay = _case(20, torch.float64, seed=1)
    plain = lightning_attention(q, k, v, decay, initial_state=s0)
    one_doc = lightning_attention(q, k, v, decay, initial_state=s0, cu_seqlens=torch.tensor([0, 20]))
    packed = lightning_attention(q, k, v, decay, initial_state=s0, cu_seqlens=torch.tensor([0, 7, 20]))
    assert torch.allclose(one_doc, plain, rtol=1e-13, atol=1e-13)
    assert torch.allclose(packed[:, :7], plain[:, :7], rtol=1e-13, atol=1e-13)  # the first document is unchanged
    assert not torch.allclose(packed[:, 7:], plain[:, 7:], rtol=1e-3)  # the state no longer crosses token 7


def test_document_ids_and_bad_offsets():
    ids = document_ids(torch.tensor([0, 2, 2, 5]), torch.arange(7), batch=3, seq_len=7)
    assert ids.tolist() == [[0, 0, 2, 2, 2, 3, 3]]  # empty document 1; the tail after 5 is one more document
    rows = document_ids([torch.tensor([0, 3]), torch.tensor([0, 1])], torch.arange(3), batch=2, seq_len=3)
    assert rows.tolist() == [[0, 0, 0], [0, 1, 1]]
    q, k, v, *_, decay = _case(10, torch.float64, seed=2)
    for cu, match in [(torch.tensor([1, 10]), "must start at 0"), (torch.tensor([0, 6, 4, 10]), "non-decreasing"),
                      (torch.tensor([0, 11]), "sequence length 10"),
                      ((torch.tensor([0, 10]),) * 3, "3 rows for a batch of 2")]:
        with pytest.raises(ValueError, match=match):
            lightning_attention(q, k, v, decay, cu_seqlens=cu)


def test_closing_figure_command(capsys):
    from longreach.bench.lightning_documents import kernel_errors, main

    row = kernel_errors("chunk", torch.float64, seq_len=40, chunk=8)
    assert row["rel_err"] < 1e-12 and row["max_abs_err"] < 1e-10
    assert main(["--ranks", "two"]) == 2
    assert "--ranks must be comma-separated integers" in capsys.readouterr().err
