"""``longreach report``: scaling arithmetic on records with known times, PNG output, bad input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from longreach.bench.report import load_results, main, write_report
from longreach.errors import UserError


def _rec(world: int, strategy: str, layout: str, seq_len: int, t_fb: float, *, status: str = "ok") -> dict:
    flops = 4.0 * seq_len * seq_len * 4 * 32 * 0.5
    rec = {"kind": "sweep_point", "sweep": "t", "status": status,
           "config": {"backend": "cpu", "mask": "causal", "strategy": strategy, "layout": layout, "seq_len": seq_len,
                      "world": world, "ulysses_degree": None, "batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 32,
                      "dtype": "float32", "device": "cpu"},
            "hardware": {"cpu_model": "test cpu", "cpu_cores": 2, "gpu_name": None, "gpu_count": 0},
            "software": {"python": "3", "torch": "x", "longreach": "y", "triton": "z"}}
    if status != "ok":
        rec["reason"] = "heads do not divide"
        return rec
    times = {"median": t_fb, "min": t_fb, "max": t_fb, "iqr": 0.0, "spread": 0.0, "all": [t_fb]}
    rec.update({"density": 0.5, "flops_fwd": flops, "flops_fwd_bwd": 3.5 * flops, "time_fwd": dict(times),
                "time_fwd_bwd": times, "tokens_per_s": seq_len / t_fb, "tokens_per_s_fwd": seq_len / t_fb,
                "tflops_fwd": 1.0, "tflops_fwd_bwd": 1.0, "mfu_fwd_bwd": None,
                "memory": {"peak_bytes_max": seq_len * 1000, "peak_bytes_per_rank": [seq_len * 1000] * world},
                "comm": {"fwd_bytes_max": 10, "bwd_bytes_max": 20}, "balance": {"work_max_over_mean": 1.0}})
    return rec


def test_scaling_tables(tmp_path: Path) -> None:
    recs = [_rec(1, "none", "contiguous", 1024, 1.0), _rec(1, "none", "contiguous", 2048, 4.0),
            _rec(2, "ring", "zigzag", 2048, 2.5), _rec(2, "ring", "zigzag", 1024, 0.8),
            _rec(2, "ulysses", "zigzag", 2048, 0.0, status="skipped")]
    path = write_report(recs, tmp_path)
    md = path.read_text()
    # strong scaling at S=2048: t1 / (2 t2) = 4 / 5 = 80 %, speed-up 1.6×
    assert re.search(r"\| ring/zigzag \| 2048 \| 2 \| 1\.60× \| 80% \|", md), md
    # S=1024: 1 / (2·0.8) = 62 %
    assert re.search(r"\| ring/zigzag \| 1024 \| 2 \| 1\.25× \| 62% \|", md)
    # weak scaling, 1024 tokens per rank: FLOP/s per rank at P=2 (S=2048: 4× the FLOPs in 2.5 s on 2 ranks)
    # over 1 rank at S=1024 (1 s): (4/2.5/2)/1 = 80 %; plain time ratio 1/2.5 = 0.40
    assert re.search(r"\| ring/zigzag \| 1024 \| 2 \| 2048 \| 80% \| 0\.40 \|", md), md
    assert "heads do not divide" in md and "test cpu" in md
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"({png.name})" in md


def test_latest_record_wins(tmp_path: Path) -> None:
    recs = [_rec(1, "none", "contiguous", 1024, 1.0), _rec(2, "ring", "zigzag", 1024, 5.0),
            _rec(2, "ring", "zigzag", 1024, 1.0)]
    md = write_report(recs, tmp_path).read_text()
    assert re.search(r"\| ring/zigzag \| 1024 \| 2 \| 1\.00× \| 50% \|", md)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_results([tmp_path / "missing.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_rec(1, "none", "contiguous", 64, 1.0)) + "\n{oops\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        load_results([bad])
    empty = tmp_path / "other.jsonl"
    empty.write_text('{"kind": "something_else"}\n')
    with pytest.raises(UserError, match="no 'longreach bench sweep' records"):
        main([str(empty), "--out", str(tmp_path / "o")])
