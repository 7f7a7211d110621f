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

import importlib
from typing import Callable, TypeVar

from torch import nn

from .config import ModelConfig

MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {}
ATTENTION_TYPES: dict[str, Callable[[ModelConfig, int], nn.Module]] = {}
FFN_TYPES: dict[str, Callable[[ModelConfig, int], nn.Module]] = {}

F = TypeVar("F", bound=Callable)


def _register(table: dict, name: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        table[name] = fn
        return fn

    return deco


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: register an architecture constructor ``fn(cfg: ModelConfig) -> nn.Module`` as ``name``."""
    return _register(MODELS, name)


def register_attention(name: str) -> Callable[[F], F]:
    """Decorator: register an attention-layer constructor ``fn(cfg, layer_idx) -> nn.Module`` as ``name``."""
    return _register(ATTENTION_TYPES, name)


def register_ffn(name: str) -> Callable[[F], F]:
    """Decorator: register a feed-forward constructor ``fn(cfg, layer_idx) -> nn.Module`` as ``name``."""
    return _register(FFN_TYPES, name)


def lookup(table: dict, name: str, setting: str) -> Callable:
    """``table[name]``, importing the plug-in module that registers it if needed; else a clear error."""
    if name not in table:
        for module in (f"longreach.models.{name}", "longreach.mixtures"):
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name is None or not module.startswith(e.name):
                    raise
            if name in table:
                break
    if name not in table:
        raise ValueError(f"{setting}={name!r} is not registered; known: {', '.join(sorted(table)) or 'none'}")
    return table[name]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Construct the model ``cfg.arch`` names (on the current default device and dtype)."""
    return lookup(MODELS, cfg.arch, "model.arch")(cfg)


from . import llama  # noqa: E402,F401  (registers llama, mha, swiglu)

__all__ = ["ATTENTION_TYPES", "FFN_TYPES", "MODELS", "ModelConfig", "build_model", "lookup",
           "register_attention", "register_ffn", "register_model"]
