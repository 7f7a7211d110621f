"""``_flash_attn_forward`` / ``_flash_attn_backward`` with flash-attn 2.6's signatures, on the aten CPU
flash kernel. Layout ``[B, S, H, D]`` in and out, lse ``[B, H, S]`` float32, like flash-attn."""
from __future__ import annotations

import torch

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                        softcap=0.0, alibi_slopes=None, return_softmax=False):
    if dropout_p or softcap or alibi_slopes is not None or window_size_left != -1 or window_size_right != -1:
        raise NotImplementedError("the CPU stand-in covers causal / full attention only")
    out, lse = _fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, bool(causal),
                    scale=softmax_scale)
    return out.transpose(1, 2), lse.float(), None, None


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                         deterministic=False, rng_state=None):
    gq, gk, gv = _bwd(dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                      out.transpose(1, 2), softmax_lse, 0.0, bool(causal), scale=softmax_scale)
    dq.copy_(gq.transpose(1, 2))
    dk.copy_(gk.transpose(1, 2))
    dv.copy_(gv.transpose(1, 2))
    return dq, dk, dv, None


def _flash_attn_varlen_forward(*args, **kwargs):
    raise NotImplementedError("the CPU stand-in has no varlen functions (imported by peers, never called here)")


_flash_attn_varlen_backward = _flash_attn_varlen_forward


class _FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal):
        out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, ctx.softmax_scale, ctx.causal)
        return dq, dk, dv, None, None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's public ``flash_attn_func`` ([B, S, H, D] in and out) on the stand-in's two functions."""
    if dropout_p or softcap or alibi_slopes is not None or tuple(window_size) != (-1, -1) or return_attn_probs:
        raise NotImplementedError("the CPU stand-in covers causal / full attention only")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _FlashAttnFunc.apply(q, k, v, scale, bool(causal))
