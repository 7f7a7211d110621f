"""Rotary position embeddings and their position-extension variants (PI, NTK, YaRN, Llama-3).

Frequencies are θ_i = b^(−2i/d) for i < d/2 (d = head_dim, b = ``rope_theta``). The scalings:

* ``linear`` (position interpolation): positions m/s, i.e. θ_i / s.
* ``ntk`` (static NTK-aware): base b′ = b·s^(d/(d−2)).
* ``dynamic`` (dynamic NTK): for a current length L_cur > L, b′ = b·((s·L_cur/L) − (s−1))^(d/(d−2));
  unchanged for L_cur ≤ L.
* ``yarn``: per pair i, θ′_i = θ_i·γ_i + (θ_i/s)(1−γ_i), where γ is 1 for pairs that turn more than
  β_fast (default 32) times over L, 0 for those turning fewer than β_slow (default 1) times, and linear
  in the pair index i in between: the ramp ends are the (fractional) pair indices where the rotation
  count r_i = L·θ_i/(2π) equals β_fast and β_slow, rounded outwards to whole indices unless
  ``truncate: false``. This is the reference YaRN code's form, which transformers implements, so a
  converted model rotates exactly as ours. cos and sin are multiplied by the attention factor (default
  0.1·ln s + 1; with ``mscale`` and ``mscale_all_dim`` their ratio of such terms).
* ``llama3``: wavelengths shorter than L/high_freq_factor keep θ, longer than L/low_freq_factor use θ/s,
  in between blend with smooth = (L/λ − low)/(high − low): θ′ = (1−smooth)·θ/s + smooth·θ.

L is ``original_max_position_embeddings`` when given, else the model's ``max_seq_len``.
The rotation pairs dimension j with j + d/2 (the "rotate half" convention of HF Llama checkpoints).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _kind(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("type", scaling.get("rope_type", "default")))


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    *,
    max_seq_len: int,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ′_i and the cos/sin multiplier for one RoPE configuration.

    Args:
        head_dim: d, even.
        theta: base b.
        scaling: ``rope_scaling`` mapping (type linear|ntk|dynamic|yarn|llama3 and its keys) or None.
        max_seq_len: the model's training length (L unless ``original_max_position_embeddings`` is set).
        seq_len: current sequence length (dynamic NTK reads it); None = L.

    Returns:
        ``(inv_freq [d/2] float64, attention_factor)``.
    """
    d = head_dim
    idx = torch.arange(0, d, 2, dtype=torch.float64) / d  # [d/2]: 2i/d
    kind = _kind(scaling)
    s = float(scaling.get("factor", 1.0)) if scaling else 1.0
    length = int(scaling.get("original_max_position_embeddings", max_seq_len)) if scaling else max_seq_len
    base_freq = theta ** (-idx)  # [d/2]
    if kind == "default":
        return base_freq, 1.0
    if kind == "linear":
        return base_freq / s, 1.0
    if kind == "ntk":
        return (theta * s ** (d / (d - 2))) ** (-idx), 1.0
    if kind == "dynamic":
        cur = seq_len if seq_len is not None else length
        if cur <= length:
            return base_freq, 1.0
        b = theta * ((s * cur / length) - (s - 1)) ** (d / (d - 2))
        return b ** (-idx), 1.0
    if kind == "yarn":
        gamma = _yarn_ramp(scaling, d, theta, length)  # [d/2]
        return base_freq * gamma + (base_freq / s) * (1 - gamma), _yarn_attention_factor(scaling, s)
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / base_freq
        smooth = ((length / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        blended = (1 - smooth) * base_freq / s + smooth * base_freq
        out = torch.where(wavelen < length / high, base_freq, blended)
        out = torch.where(wavelen > length / low, base_freq / s, out)
        return out, 1.0
    raise ValueError(f"model.rope_scaling.type {kind!r} is not one of linear, ntk, dynamic, yarn, llama3")


def _yarn_attention_factor(scaling: dict[str, Any], s: float) -> float:
    """YaRN's cos/sin multiplier: ``attention_factor``, else 0.1·ln s + 1 (or the mscale ratio)."""
    def mscale(m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(float(scaling["mscale"])) / mscale(float(scaling["mscale_all_dim"]))
    return mscale()


def _yarn_ramp(scaling: dict[str, Any], d: int, theta: float, length: int) -> torch.Tensor:
    """γ ``[d/2]`` float64: 1 keeps θ_i (fast pairs), 0 interpolates to θ_i/s (slow pairs)."""
    beta_fast = float(scaling.get("beta_fast") or 32.0)
    beta_slow = float(scaling.get("beta_slow") or 1.0)

    def pair_index(rotations: float) -> float:  # the fractional i at which r_i = rotations
        return d * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as the reference code: no zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)  # [d/2]
    return 1.0 - ramp


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given (global or per-document) position ids.

    No buffers depend on the sequence: cos/sin are computed from the position ids each call, so they
    always follow the tokens whatever the context-parallel layout (a RoPE cache that is not sharded
    with the tokens is a known source of silent errors).
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_seq_len: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_seq_len = head_dim, theta, scaling, max_seq_len
        # float64 and not a buffer: ``model.to(torch.bfloat16)`` must not round the frequencies
        self.inv_freq, self.attention_factor = rope_frequencies(head_dim, theta, scaling, max_seq_len=max_seq_len)

    def forward(self, position_ids: torch.Tensor, seq_len: int | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, S, d/2]`` in ``dtype`` for ``position_ids`` ``[B, S]`` (``seq_len``: global length).

        Angles are formed in float64 (positions up to millions times θ_0 = 1 lose digits in float32).
        """
        inv_freq, att = self.inv_freq, self.attention_factor
        if _kind(self.scaling) == "dynamic":
            inv_freq, att = rope_frequencies(self.head_dim, self.theta, self.scaling, max_seq_len=self.max_seq_len,
                                             seq_len=seq_len)
        angles = position_ids.to(torch.float64)[..., None] * inv_freq.to(position_ids.device)  # [B, S, d/2]
        return (angles.cos() * att).to(dtype), (angles.sin() * att).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (j, j + d/2) of ``x`` ``[B, S, H, D]`` by the angles of ``cos``/``sin`` ``[B, S, D/2]``."""
    half = x.shape[-1] // 2
    dt = torch.promote_types(x.dtype, torch.float32)  # rotate in float32 at least (float64 stays float64)
    x1, x2 = x[..., :half].to(dt), x[..., half:].to(dt)  # [B, S, H, D/2]
    c, s = cos[:, :, None, :].to(dt), sin[:, :, None, :].to(dt)  # [B, S, 1, D/2]
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)  # [B, S, H, D]
    return out.to(x.dtype)
