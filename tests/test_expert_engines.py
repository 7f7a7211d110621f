"""Expert parallelism under the engines — FSDP2 (expert mesh dimension) and DeepSpeed ZeRO (dense part) —
against replicated training of the same model, with checkpoints resharded across engines and world sizes."""
from __future__ import annotations

import pytest

from longreach.testing import run_ranks
from workers import moe as W


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_expert_parallel_under_engine_matches_replicated_and_reshards(tmp_path, engine):
    results = run_ranks(W.engine_expert_parallel_checks, 2, args=(str(tmp_path), engine), timeout=400)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures)
