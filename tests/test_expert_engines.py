"""Expert parallelism under the engines — FSDP2 (expert mesh dimension), DeepSpeed ZeRO 0-3 (dense part;
bf16 with fp32 expert masters) and accelerate — against replicated training of the same model, with
checkpoints resharded across engines and world sizes; the per-rank expert bytes ``bench mixtures`` reports."""
from __future__ import annotations

from longreach.testing import run_ranks
from workers import expert_engines as W

BENCH_ENGINES = ["zero0", "zero3", "zero2-bf16", "zero3-bf16", "accelerate"]


def test_expert_parallel_under_engines_matches_replicated_and_reshards(tmp_path):
    results = run_ranks(W.engines_and_expert_bytes, 2, args=(str(tmp_path), list(W.ENGINE_RUNS), BENCH_ENGINES),
                        timeout=600)
    failures = [f for r in results for f in r["failures"]]
    total = 2 * 3 * 4 * 16 * 24 * 4  # 2 layers × 3 weights × 4 experts × dim 16 × hidden 24, fp32
    for rank, r in enumerate(results):
        for name in BENCH_ENGINES:
            got = r["expert_bytes"][name]
            if (got["expert_bytes"], got["expert_bytes_total"]) != (total // 2, total):
                failures.append(f"bench expert bytes {name} rank {rank}: {got}, want {total // 2} of {total}")
        error = r["zero0_fp16_error"] or ""
        if "model.moe.expert_parallel" not in error or "engine.options.zero_stage=0" not in error:
            failures.append(f"rank {rank}: DeepSpeed ZeRO-0 fp16 with split experts: ConfigError {error!r}")
    assert not failures, "\n".join(failures)
