"""Lightning attention: chunked, Triton (interpreted on CPU) and recurrent against the float64 naive oracle."""
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU (must be set before triton loads them)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402

import pytest  # noqa: E402

from longreach.kernels import lightning_attention  # noqa: E402
from longreach.kernels.lightning import decode_step, document_ids  # noqa: E402
from longreach.bench.lasp_ranks import each_document_alone  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _case(seq_len: int, dtype: torch.dtype, seed: int = 0, b: int = 2, h: int = 3, d: int = 6, e: int = 5):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, seq_len, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, seq_len, h, e, generator=g, dtype=torch.float64)
    s0 = torch.randn(b, h, d, e, generator=g, dtype=torch.float64)
    dout = torch.randn(b, seq_len, h, e, generator=g, dtype=torch.float64)
    dstate = torch.randn(b, h, d, e, generator=g, dtype=torch.float64)
    decay = torch.tensor([0.9, 0.05, 0.002], dtype=torch.float64)[:h]
    return [x.to(dtype) for x in (q, k, v, s0, dout, dstate, decay)]


def _run(backend: str, tensors, chunk_size: int | None, with_state: bool, cu_seqlens=None):
    q, k, v, s0, dout, dstate, decay = tensors
    leaves = [x.clone().requires_grad_() for x in ((q, k, v, s0) if with_state else (q, k, v))]
    out, state = lightning_attention(*leaves[:3], decay, backend=backend, chunk_size=chunk_size,
                                     initial_state=leaves[3] if with_state else None, return_state=True,
                                     cu_seqlens=cu_seqlens)
    loss = (out.double() * dout.double()).sum() + (state.double() * dstate.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [out, state, *grads]


NAMES = ["out", "state", "dq", "dk", "dv", "ds0"]


def _compare(backend: str, seq_len: int, chunk_size: int | None, dtype: torch.dtype, tol: float,
             with_state: bool = True) -> list[str]:
    tensors = _case(seq_len, dtype, seed=seq_len)
    ref = _run("naive", [x.double() for x in tensors], None, with_state)
    got = _run(backend, tensors, chunk_size, with_state)
    return _differences(f"{backend} S={seq_len} C={chunk_size} {dtype}", got, ref, tol)


def _differences(label: str, got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> list[str]:
    """One line per tensor (out, state, dq, dk, dv, ds0) whose relative error is not below ``tol``."""
    errors = ((name, _rel(g, w)) for name, g, w in zip(NAMES, got, want))
    return [f"{label} {name}: rel err {err:.2e}" for name, err in errors if not err < tol]


def test_chunk_and_recurrent_equal_naive_float64():
    bad = []
    for seq_len, chunk in [(37, 8), (37, 64), (100, 16), (100, 7), (64, 64), (1, 4)]:
        bad += _compare("chunk", seq_len, chunk, torch.float64, 1e-12)
        bad += _compare("chunk", seq_len, chunk, torch.float64, 1e-12, with_state=False)
    for seq_len in (37, 100):
        bad += _compare("recurrent", seq_len, None, torch.float64, 1e-12)
    assert not bad, "\n".join(bad)


def test_chunk_float32_and_output_dtypes():
    bad = _compare("chunk", 100, 32, torch.float32, 2e-6)
    assert not bad, "\n".join(bad)
    q, k, v, s0, *_ , decay = _case(20, torch.bfloat16)
    out, state = lightning_attention(q, k, v, decay.float(), return_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    ref = lightning_attention(q.double(), k.double(), v.double(), decay.double(), backend="naive")
    assert _rel(out, ref) < 2e-2


def test_triton_interpreted_equals_naive():
    bad = []
    for seq_len, chunk in [(37, 16), (100, 32)]:
        bad += _compare("triton", seq_len, chunk, torch.float32, 2e-6)
    bad += _compare("triton", 50, 16, torch.float32, 2e-6, with_state=False)
    assert not bad, "\n".join(bad)


def test_prefill_then_decode_equals_one_shot():
    q, k, v, _, _, _, decay = _case(41, torch.float64)
    full, full_state = lightning_attention(q, k, v, decay, backend="naive", return_state=True)
    prefill = 29
    out, state = lightning_attention(q[:, :prefill], k[:, :prefill], v[:, :prefill], decay, backend="chunk",
                                     chunk_size=8, return_state=True)
    outs = [out]
    for t in range(prefill, q.shape[1]):
        o, state = decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], decay, state)
        outs.append(o)
    assert _rel(torch.cat(outs, dim=1), full) < 1e-12
    assert _rel(state, full_state) < 1e-12


def test_initial_state_term_matches_formula():
    # one token with zero k: output is exactly exp(-s) q S0
    q, k, v, s0, _, _, decay = _case(1, torch.float64)
    out = lightning_attention(q, torch.zeros_like(k), v, decay, initial_state=s0, backend="chunk")
    want = torch.einsum("bhd,bhde->bhe", q[:, 0], s0) * torch.exp(-decay)[None, :, None]
    assert _rel(out[:, 0], want) < 1e-14


def test_auto_backend_on_cpu_is_chunk_and_signature():
    sig = inspect.signature(lightning_attention)
    # the contract's parameters, then the keyword-only packed-documents offsets
    assert list(sig.parameters) == ["q", "k", "v", "decay", "backend", "chunk_size", "initial_state", "return_state",
                                    "cu_seqlens"]
    assert sig.parameters["cu_seqlens"].kind is inspect.Parameter.KEYWORD_ONLY
    q, k, v, *_, decay = _case(30, torch.float64)
    a = lightning_attention(q, k, v, decay)
    b = lightning_attention(q, k, v, decay, backend="chunk")
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad,match", [
    (dict(decay=torch.tensor([0.1, 0.2])), "decay must be a \\[H\\]"),
    (dict(decay=torch.tensor([0.1, -0.2, 0.3])), "decay rates must be finite and >= 0"),
    (dict(backend="flash"), "unknown lightning attention backend"),
    (dict(initial_state=torch.zeros(2, 3, 6, 4)), "initial_state must be"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(v=torch.zeros(2, 9, 3, 5)), "v must be"),
])
def test_bad_input_is_one_clear_error(bad, match):
    q, k, v, *_, decay = _case(10, torch.float32)
    args = dict(q=q, k=k, v=v, decay=decay.float()) | bad
    kw = {key: args.pop(key) for key in ("backend", "initial_state", "chunk_size") if key in args}
    with pytest.raises(ValueError, match=match):
        lightning_attention(args["q"], args["k"], args["v"], args["decay"], **kw)


@pytest.mark.gpu
def test_triton_cuda_bf16_close_to_naive():
    q, k, v, s0, dout, dstate, decay = (x.cuda() for x in _case(1000, torch.float32, d=64, e=64))
    out, state = lightning_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), decay, initial_state=s0,
                                     backend="triton", return_state=True)
    ref, ref_state = lightning_attention(q.double(), k.double(), v.double(), decay.double(),
                                         initial_state=s0.double(), backend="naive", return_state=True)
    assert _rel(out, ref) < 3e-2 and _rel(state, ref_state) < 3e-2


# ---------------------------------------------------------------------------------- packed documents
def _per_document(tensors, cu_rows: list[torch.Tensor], with_state: bool):
    """Oracle: float64 naive lightning on each document of each row alone; S0 enters the first document."""
    q, k, v, s0, dout, dstate, decay = [x.double() for x in tensors]
    leaves = [x.clone().requires_grad_() for x in ((q, k, v, s0) if with_state else (q, k, v))]
    out, state = each_document_alone(*leaves[:3], decay, cu_rows, leaves[3] if with_state else None)
    loss = (out * dout).sum() + (state * dstate).sum()
    return [out, state, *torch.autograd.grad(loss, leaves)]


def _compare_documents(backend, seq_len, cu, chunk, dtype, tol, with_state=True) -> list[str]:
    tensors = _case(seq_len, dtype, seed=seq_len + (chunk or 0))
    rows = list(cu) if isinstance(cu, tuple) else [torch.as_tensor(cu)]
    want = _per_document(tensors, rows, with_state)
    got = _run(backend, tensors, chunk, with_state, cu)
    return _differences(f"{backend} S={seq_len} C={chunk} {dtype} cu={cu}", got, want, tol)


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
            bad += _compare_documents("chunk", 37, cu, chunk, torch.float64, 1e-12)
        bad += _compare_documents("chunk", 37, cu, 8, torch.float64, 1e-12, with_state=False)
        bad += _compare_documents("recurrent", 37, cu, None, torch.float64, 1e-12)
        bad += _compare_documents("naive", 37, cu, None, torch.float64, 1e-12)
    assert not bad, "\n".join(bad)


def test_documents_chunk_float32():
    bad = _compare_documents("chunk", 37, CU_37[0], 8, torch.float32, 2e-6)
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
