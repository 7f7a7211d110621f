"""Triton lightning kernels, interpreted on CPU: packed documents, fp16, int64 offsets and the block grid."""
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU (must be set before triton loads them)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from longreach.kernels import lightning_attention  # noqa: E402
from longreach.kernels.lightning import triton as lt  # noqa: E402
from longreach.bench.lasp_ranks import each_document_alone  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _inputs(seq_len: int, seed: int, b: int = 2, h: int = 2, d: int = 16, e: int = 16):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, seq_len, h, d, generator=g) for _ in range(2))
    v = torch.randn(b, seq_len, h, e, generator=g)
    s0, dstate = (torch.randn(b, h, d, e, generator=g) for _ in range(2))
    dout = torch.randn(b, seq_len, h, e, generator=g)
    return q, k, v, s0, dout, dstate, torch.tensor([0.7, 0.01])[:h]


def _check_packed(dtype: torch.dtype, tol: float, cu, chunk: int) -> list[str]:
    """Triton with documents, initial state and d(final state) against each document alone (float64 naive
    on the same dtype-rounded inputs): out, state, dq, dk, dv, ds0."""
    q, k, v, s0, dout, dstate, decay = _inputs(40, seed=chunk)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    out, state = lightning_attention(*leaves[:3], decay, backend="triton", chunk_size=chunk, initial_state=leaves[3],
                                     return_state=True, cu_seqlens=cu)
    got = [out, state, *torch.autograd.grad((out.double() * dout.double()).sum()
                                            + (state.double() * dstate.double()).sum(), leaves)]
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v, s0)]
    rows = list(cu) if isinstance(cu, tuple) else [cu]
    ref, ref_state = each_document_alone(*ref_leaves[:3], decay.double(), rows, ref_leaves[3])
    want = [ref, ref_state, *torch.autograd.grad((ref * dout.double()).sum() + (ref_state * dstate.double()).sum(),
                                                 ref_leaves)]
    bad = []
    for name, g, w, dt in zip(["out", "state", "dq", "dk", "dv", "ds0"], got, want,
                              [dtype, torch.float32, dtype, dtype, dtype, torch.float32]):
        err = _rel(g, w)
        if not err < tol or g.dtype != dt:
            bad.append(f"triton {dtype} C={chunk} cu={cu} {name}: rel err {err:.2e} dtype {g.dtype}")
    return bad


def test_triton_packed_documents_equal_each_document_alone_fp32_and_fp16():
    # boundaries on a block edge (16), a single-token document (16..17), different offsets per row;
    # fp16 keeps its operands in fp16 (score and state rounded to it), so its tolerance is fp16's
    bad = _check_packed(torch.float32, 2e-6, (torch.tensor([0, 16, 17, 40]), torch.tensor([0, 5, 40])), 16)
    bad += _check_packed(torch.float16, 2e-3, torch.tensor([0, 9, 30]), 16)
    assert not bad, "\n".join(bad)


@triton.jit
def _offsets_kernel(OUT, OUT_NAIVE, STATE_OUT, b, h, start, stride_b, stride_s, stride_h, bh, t, n_blocks,
                    BLOCK: tl.constexpr, BW: tl.constexpr):
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BW)
    here = tl.arange(0, BLOCK)[:, None] * BW + tl.arange(0, BW)[None, :]
    tl.store(OUT + here, lt._row_offsets(b, h, rows, cols, stride_b, stride_s, stride_h))
    # the same sum in the kernel's default int32 arithmetic (what the kernels computed before)
    naive = b * stride_b + rows[:, None] * stride_s + h * stride_h + cols[None, :]
    tl.store(OUT_NAIVE + here, naive.to(tl.int64))
    tl.store(STATE_OUT + here, lt._state_offsets(bh, t, n_blocks, tl.arange(0, BLOCK), cols, BW, 1, BLOCK * BW))


def test_offsets_are_int64_past_two_to_the_31():
    # a [B, S, H, D] tensor past 2^31 elements (e.g. 1M tokens x 16 heads x 128), built from its strides only:
    # batch 3 of stride 2^30 + 7, rows from 2^20 at stride 4096 (16 heads x 256), head 5
    b, h, start, stride_b, stride_s, stride_h = 3, 5, 1 << 20, (1 << 30) + 7, 4096, 256
    bh, t, n_blocks = 40_000, 16_000, 16_384
    out, naive, state = (torch.empty(16, 16, dtype=torch.int64) for _ in range(3))
    _offsets_kernel[(1,)](out, naive, state, b, h, start, stride_b, stride_s, stride_h, bh, t, n_blocks,
                          BLOCK=16, BW=16)
    r, c = torch.arange(16)[:, None], torch.arange(16)[None, :]
    want = b * stride_b + (start + r) * stride_s + h * stride_h + c
    assert int(want.max()) > 2 ** 32 and torch.equal(out, want)
    assert not torch.equal(naive, want)  # int32 arithmetic wraps at this size: the construction reaches it
    assert torch.equal(state, (bh * n_blocks + t) * 256 + r * 16 + c)


def test_grid_is_split_over_blocks_with_explicit_launch_options(monkeypatch):
    launches = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, tuple(grid), kwargs))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_block_state_kernel", "_scan_kernel", "_rows_kernel"):
        monkeypatch.setattr(lt, name, Recorder(name, getattr(lt, name)))
    q, k, v, _, dout, _, decay = _inputs(40, seed=1, b=1, d=8, e=8)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = lightning_attention(*leaves, decay, backend="triton", chunk_size=16)
    torch.autograd.grad((out * dout).sum(), leaves)
    names = [n for n, _, _ in launches]
    # forward: block states, scan, rows; backward: two block states, two scans, three rows (dq, dk, dv)
    assert names.count("_block_state_kernel") == 3 and names.count("_scan_kernel") == 3
    assert names.count("_rows_kernel") == 4
    for name, grid, kwargs in launches:
        assert "num_warps" in kwargs and "num_stages" in kwargs, (name, kwargs)
        want = (1 * 2, 1) if name == "_scan_kernel" else (3, 1 * 2, 1)  # (B·H, tiles) or (blocks, B·H, tiles)
        assert grid == want, (name, grid)
    assert lt._launch_options(64, 256) == {"num_warps": 8, "num_stages": 1}
    assert lt._launch_options(64, 16) == {"num_warps": 4, "num_stages": 2}


@pytest.mark.gpu
def test_triton_cuda_fp32_is_ieee_and_bf16_close_with_documents():
    # on a GPU, TF32 dots would miss 2e-5 at this size; bf16 operands with fp32 accumulation stay within 3e-2
    q, k, v, s0, dout, dstate, decay = (x.cuda() for x in _inputs(1000, seed=5, d=64, e=64))
    cu = torch.tensor([0, 100, 101, 640, 1000], device="cuda")
    ref, ref_state = lightning_attention(q.double(), k.double(), v.double(), decay.double(), backend="naive",
                                         initial_state=s0.double(), return_state=True, cu_seqlens=cu)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        out, state = lightning_attention(q.to(dtype), k.to(dtype), v.to(dtype), decay, backend="triton",
                                         initial_state=s0, return_state=True, cu_seqlens=cu)
        assert _rel(out, ref) < tol and _rel(state, ref_state) < tol, (dtype, _rel(out, ref), _rel(state, ref_state))
