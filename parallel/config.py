"""Parallel settings of a job (the ``parallel:`` section of a config)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    dp: int = -1
    """Data-parallel degree; -1 = whatever is left of the world size after ``cp``."""
    cp: int = 1
    """Context-parallel degree: ranks that split each sequence."""
    strategy: str = "ring"
    """Context-parallel strategy of softmax layers: ring, ulysses, hybrid, allgather."""
    layout: str = "zigzag"
    """Sequence layout over the cp ranks: contiguous, zigzag, stripe."""
    ulysses_degree: int | None = None
    """For strategy=hybrid: ranks per Ulysses group (consecutive ranks); the rest form ring groups."""
    linear_variant: str = "lasp2"
    """Sequence parallelism of linear-attention layers: lasp1 or lasp2."""
    backend: str = "auto"
    """Local attention backend used inside the strategy."""

    def __post_init__(self) -> None:
        if self.cp < 1:
            raise ValueError(f"parallel.cp must be >= 1, got {self.cp}")
        if self.dp == 0 or self.dp < -1:
            raise ValueError(f"parallel.dp must be >= 1 or -1 (auto), got {self.dp}")
        if self.strategy not in ("ring", "ulysses", "hybrid", "allgather"):
            raise ValueError(f"parallel.strategy must be one of ring, ulysses, hybrid, allgather; got {self.strategy!r}")
        if self.layout not in ("contiguous", "zigzag", "stripe"):
            raise ValueError(f"parallel.layout must be one of contiguous, zigzag, stripe; got {self.layout!r}")
        if self.linear_variant not in ("lasp1", "lasp2"):
            raise ValueError(f"parallel.linear_variant must be lasp1 or lasp2; got {self.linear_variant!r}")
