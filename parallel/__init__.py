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

from .lasp import linear_cp_attention  # noqa: E402

__all__ += ["linear_cp_attention"]

from .layouts import DocumentZigzag, pad_documents, shard_documents, unshard_documents  # noqa: E402
from .comm import CommRecorder, CPGroup, WorkCounter  # noqa: E402
from .cp import STRATEGIES, cp_attention  # noqa: E402
from .mesh import GROUP_NAMES, ParallelDims  # noqa: E402

__all__ += ["DocumentZigzag", "pad_documents", "shard_documents", "unshard_documents", "CommRecorder", "CPGroup",
            "WorkCounter", "STRATEGIES", "cp_attention", "GROUP_NAMES", "ParallelDims"]

from .expert import ExpertDispatch, all_to_all_variable, combine_tokens, dispatch_tokens, exchange_counts  # noqa: E402
