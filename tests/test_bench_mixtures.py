"""``longreach bench mixtures``: the table's rows, FLOP ratios and memory counts on a tiny configuration."""
from __future__ import annotations

import json

import pytest
import torch

from longreach.bench import mixtures as bench
from longreach.launchers import cli

torch.set_num_threads(1)

TINY = ["--seq-len", "32", "--dim", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--moh-shared", "1",
        "--moh-top-k", "1", "--moe-experts", "4", "--moe-top-k", "2", "--ffn-hidden", "16", "--rounds", "2"]


def test_bench_mixtures_rows_and_flop_ratios(tmp_path, capsys):
    out = tmp_path / "mix.json"
    assert cli.main(["bench", "mixtures", *TINY, "--json", str(out)]) == 0
    rows = {r["layer"]: r for r in json.loads(out.read_text())["rows"]}
    b, s, dim, d = 1, 32, 32, 8
    pairs = s * (s + 1) / 2
    proj = 2.0 * b * s * dim * d * (2 * 4 + 2 * 2)  # q, o of 4 heads; k, v of 2
    dense = proj + 4.0 * b * 4 * d * pairs
    routed = rows["moh 1 of 3 routed (+1 shared), routed"]
    assert routed["baseline"] == "dense attn H=4"
    assert routed["flop_ratio"] == pytest.approx((proj + 4.0 * b * 2 * d * pairs) / dense)
    assert rows["moh 1 of 3 routed (+1 shared), masked"]["flop_ratio"] == pytest.approx(1.0)
    assert rows["moh core (2 of 4 heads active)"]["flop_ratio"] == pytest.approx(0.5)
    moe = rows["moe 4 experts top-2"]
    assert moe["baseline"] == "dense ffn hidden=32"
    assert moe["flop_ratio"] == pytest.approx(1 + 4 / (3 * 2 * 16))  # router on top of equal expert FLOPs
    assert {"sqa H_q=2 H_kv=2", "bam moa 2x4 heads", "dense attn H=8"} <= set(rows)
    for r in rows.values():
        assert r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["saved_mib"] > 0
        if r["baseline"] is not None:
            lo, hi = r["fwd_bwd_ratio_spread"]
            assert lo <= r["fwd_bwd_ratio"] <= hi
    table = capsys.readouterr().out
    assert "moe 4 experts top-2" in table and "FLOP ratio" in table


def test_saved_bytes_counts_distinct_storages():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    # x @ w saves x only (w's gradient needs it; x needs none): 32 floats; .sin() saves the product: 32 floats
    assert bench.saved_bytes(lambda: (x @ w).sin()) == (32 + 32) * 4
    assert bench.saved_bytes(lambda: (x.requires_grad_(True) @ w).sin()) == (32 + 64 + 32) * 4  # and w


@pytest.mark.parametrize("argv, message", [
    (["--moh-top-k", "4"], "--moh-top-k"),
    (["--kv-heads", "3"], "--kv-heads=3 must divide --heads=4"),
    (["--moe-top-k", "5"], "--moe-top-k=5 exceeds --moe-experts=4"),
])
def test_bench_mixtures_bad_options_exit_2(argv, message, capsys):
    assert cli.main(["bench", "mixtures", *TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_expert_bytes_per_rank_halved_under_ddp_and_fsdp2():
    """``bench mixtures --expert-bytes``' worker: with experts split over 2 ranks each rank stores exactly
    half of the expert weights under native DDP and under FSDP2 (which also shards the rest)."""
    from longreach.testing import run_ranks

    per_rank = run_ranks(bench.expert_bytes_worker, 2, args=(["ddp", "fsdp2"], 4, 16, 24))
    total = 2 * 3 * 4 * 16 * 24 * 4  # 2 layers × (gate, up, down) × E × dim × hidden × fp32 bytes
    for counts in per_rank:
        assert counts["ddp"]["expert_bytes"] == counts["fsdp2"]["expert_bytes"] == total // 2
        assert counts["ddp"]["expert_bytes_total"] == total
        assert counts["fsdp2"]["param_bytes"] < counts["ddp"]["param_bytes"]  # dense part FSDP2-sharded too
