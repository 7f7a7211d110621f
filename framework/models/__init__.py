"""Model registry: architectures, attention-layer kinds and feed-forward kinds, by name.

* ``MODELS``: ``arch`` → ``constructor(cfg: ModelConfig) -> nn.Module`` (``@register_model("llama")``).
* ``ATTENTION_TYPES``: ``attention_type`` → ``constructor(cfg, layer_idx) -> nn.Module`` whose
  ``forward(x [B,S,dim], cos [B,S,hd/2], sin [B,S,hd/2], ctx: AttentionContext) -> [B,S,dim]`` ends in
  ``self.inner_attention(q, k, v, ctx.for_layer(layer_idx))`` (the seam ``parallelize`` swaps).
* ``FFN_TYPES``: ``ffn_type`` → ``constructor(cfg, layer_idx) -> nn.Module`` with ``forward(x) -> x``.

Any module may set a scalar tensor ``aux_loss`` during forward (MoE balance loss …): the model sums
them into ``model.aux_loss`` and the trainer adds it to the loss.

Plug-ins register from their own modules; a name not yet registered is looked up by importing
``longreach.models.<name>`` and then ``longreach.mixtures`` once, so configs work without imports.
"""
from __future__ import annotations

from . import llama  # noqa: F401  (registers llama, mha, swiglu)
from .config import ModelConfig
from .registry import (ATTENTION_TYPES, FFN_TYPES, MODELS, build_model, lookup, register_attention, register_ffn,
                       register_model)

__all__ = ["ATTENTION_TYPES", "FFN_TYPES", "MODELS", "ModelConfig", "build_model", "lookup",
           "register_attention", "register_ffn", "register_model"]
