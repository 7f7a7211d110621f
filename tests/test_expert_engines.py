"""Expert parallelism under the engines — FSDP2 (expert mesh dimension), DeepSpeed ZeRO 0/1/2 (dense part;
bf16 with fp32 expert masters) and accelerate — against replicated training of the same model, with
checkpoints resharded across engines and world sizes."""
from __future__ import annotations

from longreach.testing import run_ranks
from workers import expert_engines as W


def test_expert_parallel_under_engines_matches_replicated_and_reshards(tmp_path):
    results = run_ranks(W.engine_expert_parallel_checks, 2, args=(str(tmp_path), list(W.ENGINE_RUNS)), timeout=600)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures)
