"""Dense softmax attention backends: ``reference`` (the oracle) and ``cpu`` (PyTorch's CPU flash kernel).

Each backend module offers the same functions (framework/ARCHITECTURE.md §2):

    forward(q, k, v, *, mask, scale) -> (out, lse)
    backward(dout, q, k, v, out, lse, *, mask, scale, grad_dtype=None) -> (dq, dk, dv)

``backward`` takes the *global* out and lse, which is what lets context parallelism compute each
block's gradients without keeping every partial result; ``grad_dtype=torch.float32`` returns float32
partial gradients of bf16 inputs (never rounded to bf16), for callers that sum several calls.
"""
