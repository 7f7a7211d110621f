"""Expert parallelism under the engines: FSDP2 (expert mesh dimension) against single-rank-equivalent
replicated training, checkpoints resharded across engines and world sizes."""
from __future__ import annotations

from longreach.testing import run_ranks
from longreach.workers import moe as W


def test_fsdp2_expert_parallel_matches_replicated_and_reshards(tmp_path):
    results = run_ranks(W.fsdp_expert_parallel_checks, 2, args=(str(tmp_path),), timeout=300)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures)
