"""Per-step metrics: ``metrics.jsonl`` (one JSON object per step), throughput and memory."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA max allocated on a GPU, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class Throughput:
    """Tokens per second between successive :meth:`tick` calls (wall clock)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()

    def tick(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = tokens / max(now - self._t, 1e-9)
        self._t = now
        return rate


class MetricsWriter:
    """Appends one JSON object per step to ``path`` (only where ``enabled``: rank 0).

    Non-finite floats are written as null so every line stays valid JSON.
    """

    def __init__(self, path: Path, *, enabled: bool = True, truncate_after: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled and truncate_after is not None and self.path.exists():
            # a resumed run rewrites the steps after its checkpoint: drop their old lines
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= truncate_after]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif enabled and truncate_after is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
