"""``longreach bench sweep``: a micro sweep end to end (1 and 2 gloo ranks), its records checked against
independent formulas (bytes per strategy, causal balance, FLOPs), the report built from it, config strictness."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longreach.bench.sweep import SweepConfig, SweepFile, enumerate_points, main, run_sweep, summarize_times
from longreach.configio import load_config
from longreach.errors import ConfigError

H, HKV, D = 4, 2, 8
SEQS = (64, 130)  # 130 tokens: contiguous splits over 2 ranks, zigzag (needs 4 | S) cannot


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("sweep") / "results.jsonl"
    cfg = SweepConfig(name="micro", strategies=["ring", "ulysses", "allgather", "hybrid"],
                      layouts=["contiguous", "zigzag"], seq_lens=list(SEQS), world_sizes=[1, 2], heads=H,
                      kv_heads=HKV, head_dim=D, warmup=1, repeats=2, device="cpu", timeout=300)
    recs = run_sweep(cfg, out, log=lambda s: None)
    return recs, out


def _find(recs: list[dict], **kw) -> dict:
    hits = [r for r in recs if all(r["config"][k] == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, len(hits))
    return hits[0]


def test_micro_sweep_records(micro: tuple[list[dict], Path]) -> None:
    recs, out = micro
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(recs) == len(enumerate_points(SweepConfig(
        strategies=["ring", "ulysses", "allgather", "hybrid"], layouts=["contiguous", "zigzag"], seq_lens=list(SEQS),
        world_sizes=[1, 2], heads=H, kv_heads=HKV, head_dim=D)))
    failures = []
    for r in recs:
        c = r["config"]
        assert r["hardware"]["cpu_cores"] >= 1 and r["software"]["torch"] == torch.__version__
        if r["status"] != "ok":
            continue
        s, p = c["seq_len"], c["world"]
        fb = r["time_fwd_bwd"]
        if not (fb["min"] <= fb["median"] <= fb["max"] and len(fb["all"]) == 2 and fb["min"] > 0):
            failures.append(("times", c))
        if abs(r["tokens_per_s"] - s / fb["median"]) > 1e-6 * r["tokens_per_s"]:
            failures.append(("tokens/s", c))
        want_flops = 4 * s * s * H * D * (s + 1) / (2 * s)
        if abs(r["flops_fwd"] - want_flops) > 1e-9 * want_flops or abs(r["flops_fwd_bwd"] - 3.5 * want_flops) > 1e-3:
            failures.append(("flops", c, r["flops_fwd"], want_flops))
        if r["mfu_fwd_bwd"] is not None:  # CPU: peak unknown, no MFU
            failures.append(("mfu on cpu", c))
        if not all(m and m > 0 for m in r["memory"]["peak_bytes_per_rank"]):
            failures.append(("memory", c))
        # bytes per rank against the strategies' minima (framework/ARCHITECTURE.md §8), float32
        n = s // p
        kv_local = 2 * n * HKV * D * 4
        q_local = n * H * D * 4
        want = {"none": 0, "ring": (p - 1) * kv_local, "allgather": (p - 1) * kv_local,
                "ulysses": (p - 1) / p * (2 * q_local + kv_local)}[c["strategy"]]
        # max over ranks: under a contiguous causal layout the last rank's K/V is needed by nobody, and
        # the ring skips sending it
        if abs(r["comm"]["fwd_bytes_max"] - want) > 1e-6 * max(1, want):
            failures.append(("bytes", c, r["comm"]["fwd_bytes_per_rank"], want))
    assert not failures, failures


def test_micro_sweep_balance_and_memory(micro: tuple[list[dict], Path]) -> None:
    recs, _ = micro
    for strategy in ("ring", "allgather"):
        cont = _find(recs, world=2, strategy=strategy, layout="contiguous", seq_len=64)
        zig = _find(recs, world=2, strategy=strategy, layout="zigzag", seq_len=64)
        # contiguous causal: the last rank's keys cover 3 of the 4 half-blocks' work vs 1 (max/mean 4/3)
        assert cont["balance"]["work_max_over_mean"] == pytest.approx(4 / 3, rel=0.02)
        assert zig["balance"]["work_max_over_mean"] == pytest.approx(1.0, abs=0.02)
    one = _find(recs, world=1, seq_len=64)
    assert one["comm"]["fwd_bytes_max"] == 0 and one["config"]["strategy"] == "none"
    small, big = _find(recs, world=1, seq_len=64), _find(recs, world=1, seq_len=130)
    assert big["memory"]["peak_bytes_max"] > small["memory"]["peak_bytes_max"]


def test_micro_sweep_skips(micro: tuple[list[dict], Path]) -> None:
    recs, _ = micro
    zig = [r for r in recs if r["config"]["seq_len"] == 130 and r["config"]["layout"] == "zigzag"
           and r["config"]["world"] == 2 and r["config"]["strategy"] != "hybrid"]
    assert zig and all(r["status"] == "skipped" and "zigzag" in r["reason"] for r in zig)
    hyb = [r for r in recs if r["config"]["strategy"] == "hybrid"]
    assert hyb and all(r["status"] == "skipped" and "ulysses_degree" in r["reason"] for r in hyb)
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == 2 + 3 * 2 + 3  # 1 rank × 2 lengths; P=2: 3 strategies × 2 layouts at 64, contiguous at 130


def test_report_from_micro_sweep(micro: tuple[list[dict], Path], tmp_path: Path) -> None:
    from longreach.bench.report import main as report_main

    _, out = micro
    assert report_main([str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    assert len(pngs) >= 7
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png.name})" in md
    assert "Strong scaling" in md and "Weak scaling" in md and "Skipped" in md


def test_summarize_times() -> None:
    s = summarize_times([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["spread"] == pytest.approx(9 / 2.5)


def test_sweep_config_is_strict(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep:\n  seq_len: [1024]\n")
    with pytest.raises(ConfigError, match="seq_lens"):
        load_config(SweepFile, bad)
    bad.write_text("sweep:\n  strategies: [ring, spiral]\n")
    with pytest.raises(ConfigError, match="spiral"):
        load_config(SweepFile, bad)
    bad.write_text("sweep:\n  heads: 6\n  kv_heads: 4\n")
    with pytest.raises(ConfigError, match="kv_heads"):
        load_config(SweepFile, bad)


@pytest.mark.parametrize("name", ["bench_cpu_sweep", "bench_h100_sweep", "bench_h200_sweep"])
def test_packaged_sweeps_load(name: str, capsys: pytest.CaptureFixture) -> None:
    cfg = load_config(SweepFile, name).sweep
    assert cfg.seq_lens and cfg.world_sizes
    if name == "bench_cpu_sweep":
        assert max(cfg.world_sizes) <= 2 and min(cfg.seq_lens) >= 1024 and max(cfg.seq_lens) <= 8192
        assert {"ring", "ulysses", "allgather"} <= set(cfg.strategies)
        assert {"zigzag", "contiguous"} <= set(cfg.layouts)
    assert main([name, "--print-config"]) == 0
    assert "points" in capsys.readouterr().out
