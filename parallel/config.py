"""Parallel settings of a job (the ``parallel:`` section of a config) and the names and checks every
other place reads them through: :data:`STRATEGIES`, :data:`LAYOUTS`, :data:`LINEAR_VARIANTS`,
:func:`check_divisible` (sequence length vs layout) and :meth:`ParallelConfig.dims` (dp × cp vs world
size, validated once by :class:`~longreach.parallel.mesh.ParallelDims`).

This package sits below the framework, so its checks raise ``ValueError``; the config loader and the
trainer turn them into the framework's one configuration error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .layouts import LAYOUTS, check_divisible
from .mesh import ParallelDims

STRATEGIES = ("ring", "ulysses", "hybrid", "allgather")
"""Context-parallel strategies of softmax attention (``cp_attention(strategy=...)``)."""
LINEAR_VARIANTS = ("lasp1", "lasp2")
"""Sequence parallelism of linear-attention layers."""

__all__ = ["LAYOUTS", "LINEAR_VARIANTS", "ParallelConfig", "STRATEGIES", "check_divisible"]


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    dp: int = -1
    """Data-parallel degree; -1 = whatever is left of the world size after ``cp``."""
    cp: int = 1
    """Context-parallel degree: ranks that split each sequence."""
    strategy: str = field(default="ring", metadata={"choices": STRATEGIES})
    """Context-parallel strategy of softmax layers: ring, ulysses, hybrid, allgather."""
    layout: str = field(default="zigzag", metadata={"choices": LAYOUTS})
    """Sequence layout over the cp ranks: contiguous, zigzag, stripe."""
    ulysses_degree: int | None = None
    """For strategy=hybrid: ranks per Ulysses group (consecutive ranks); the rest form ring groups."""
    linear_variant: str = field(default="lasp2", metadata={"choices": LINEAR_VARIANTS})
    """Sequence parallelism of linear-attention layers: lasp1 or lasp2."""

    __removed_keys__: ClassVar[dict[str, str]] = {
        "backend": "attention.backend (the local attention backend, inside context parallelism too)"}

    def __post_init__(self) -> None:
        if self.cp < 1:
            raise ValueError(f"parallel.cp must be >= 1, got {self.cp}")
        if self.dp == 0 or self.dp < -1:
            raise ValueError(f"parallel.dp must be >= 1 or -1 (auto), got {self.dp}")
        for name, choices in (("strategy", STRATEGIES), ("layout", LAYOUTS), ("linear_variant", LINEAR_VARIANTS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"parallel.{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.strategy == "hybrid" and (self.ulysses_degree is None or self.cp % self.ulysses_degree):
            raise ValueError(f"parallel.strategy=hybrid needs parallel.ulysses_degree dividing parallel.cp={self.cp}, "
                             f"got {self.ulysses_degree}")

    def dims(self, world_size: int) -> ParallelDims:
        """The validated degrees on ``world_size`` ranks (``ValueError`` naming the setting when dp × cp does
        not match); the hybrid Ulysses split only under ``strategy: hybrid``."""
        return ParallelDims(world_size=world_size, dp=self.dp, cp=self.cp,
                            ulysses_degree=self.ulysses_degree if self.strategy == "hybrid" else None)
