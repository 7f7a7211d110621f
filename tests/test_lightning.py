"""Lightning attention: chunked, Triton (interpreted on CPU) and recurrent against the float64 naive oracle."""
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU (must be set before triton loads them)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402

import pytest  # noqa: E402

from longreach.kernels import lightning_attention  # noqa: E402
from longreach.kernels.lightning import decode_step  # noqa: E402


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


def _run(backend: str, tensors, chunk_size: int | None, with_state: bool):
    q, k, v, s0, dout, dstate, decay = tensors
    leaves = [x.clone().requires_grad_() for x in ((q, k, v, s0) if with_state else (q, k, v))]
    out, state = lightning_attention(*leaves[:3], decay, backend=backend, chunk_size=chunk_size,
                                     initial_state=leaves[3] if with_state else None, return_state=True)
    loss = (out.double() * dout.double()).sum() + (state.double() * dstate.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [out, state, *grads]


NAMES = ["out", "state", "dq", "dk", "dv", "ds0"]


def _compare(backend: str, seq_len: int, chunk_size: int | None, dtype: torch.dtype, tol: float,
             with_state: bool = True) -> list[str]:
    tensors = _case(seq_len, dtype, seed=seq_len)
    ref = _run("naive", [x.double() for x in tensors], None, with_state)
    got = _run(backend, tensors, chunk_size, with_state)
    bad = []
    for name, g, r in zip(NAMES, got, ref):
        err = _rel(g, r)
        if not err < tol:
            bad.append(f"{backend} S={seq_len} C={chunk_size} {dtype} {name}: rel err {err:.2e}")
    return bad


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
