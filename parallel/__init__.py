"""longreach.parallel — everything that crosses ranks: mesh, layouts, context parallelism, LASP, EP."""
if __name__ != "longreach.parallel":  # pragma: no cover
    raise ImportError(
        f"longreach's parallel folder was imported as {__name__!r}; import it as 'longreach.parallel' "
        "(set PYTHONSAFEPATH=1 or run from outside the repository root)"
    )

from .layouts import (  # noqa: E402
    LAYOUTS,
    layout_multiple,
    pad_to_layout,
    sequence_positions,
    shard_sequence,
    unshard_sequence,
)

__all__ = [
    "LAYOUTS",
    "layout_multiple",
    "pad_to_layout",
    "sequence_positions",
    "shard_sequence",
    "unshard_sequence",
]

from .config import ParallelConfig  # noqa: E402

__all__ += ["ParallelConfig"]
