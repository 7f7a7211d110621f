"""The three registries (architectures, attention-layer kinds, feed-forward kinds) and their lookup.

Plug-in modules import their decorators from here; :mod:`longreach.models` re-exports all of it.
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
