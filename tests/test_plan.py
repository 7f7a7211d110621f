"""Cost model and ``longreach plan``: bytes against ARCHITECTURE.md §8 minima, balance, link levels, memory,
candidate rules, and the calibration recovering known parameters from synthetic measurements."""
from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest

from longreach.errors import UserError
from longreach.planning.costmodel import MODELS, attention_cost, attention_flops, causal_density, step_cost
from longreach.planning.hardware import PROFILES, get_profile, peak_flops
from longreach.planning.plan import calibrate, candidates, main, parse_tokens, split_halves

H100 = PROFILES["h100_sxm"]


def test_llama2_7b_parameter_count() -> None:
    # Meta's published size of Llama-2-7B: 6.74B parameters
    assert MODELS["llama2_7b"].params() == pytest.approx(6.74e9, rel=0.005)
    assert MODELS["llama3_8b"].params() == pytest.approx(8.03e9, rel=0.01)


def test_bytes_match_design_minima() -> None:
    p, s, h, hkv, d, eb = 4, 4096, 8, 2, 64, 2
    n = s // p
    kv, q = 2 * n * hkv * d * eb, n * h * d * eb
    ring = attention_cost(strategy="ring", layout="zigzag", world=p, seq_len=s, heads=h, kv_heads=hkv, head_dim=d,
                          profile=H100)
    assert ring.bytes_fwd == (p - 1) * kv
    uly = attention_cost(strategy="ulysses", layout="zigzag", world=p, seq_len=s, heads=h, kv_heads=hkv, head_dim=d,
                         profile=H100)
    rep = p / hkv  # 4 ranks, 2 K/V heads: each replicated twice
    assert uly.bytes_fwd == pytest.approx((p - 1) / p * (2 * q + rep * kv))
    ag = attention_cost(strategy="allgather", layout="zigzag", world=p, seq_len=s, heads=h, kv_heads=hkv, head_dim=d,
                        profile=H100)
    assert ag.bytes_fwd == (p - 1) * kv


def test_compute_bound_ring_and_balance() -> None:
    fast = dataclasses.replace(H100, intra_bw=1e30, inter_bw=1e30, latency_intra=0.0, latency_inter=0.0,
                               call_overhead=0.0)
    p, s, h, d = 8, 1 << 16, 32, 128
    total = attention_flops(batch=1, seq_len=s, heads=h, head_dim=d, density=causal_density(s))
    zig = attention_cost(strategy="ring", layout="zigzag", world=p, seq_len=s, heads=h, kv_heads=h, head_dim=d,
                         profile=fast)
    cont = attention_cost(strategy="ring", layout="contiguous", world=p, seq_len=s, heads=h, kv_heads=h, head_dim=d,
                          profile=fast)
    assert zig.fwd_s == pytest.approx(total / p / fast.kernel_flops, rel=1e-9)
    assert cont.imbalance == pytest.approx((2 * p - 1) / p) and zig.imbalance == 1.0
    assert cont.fwd_s / zig.fwd_s == pytest.approx((2 * p - 1) / p, rel=1e-9)
    assert zig.bwd_s == pytest.approx(2.5 * zig.fwd_s / fast.bwd_efficiency, rel=1e-9)


def test_ring_crosses_nodes_beyond_gpus_per_node() -> None:
    slow_compute = dataclasses.replace(H100, attention_flops=1.0, call_overhead=0.0)  # compute-bound
    fast_compute = dataclasses.replace(H100, attention_flops=1e30, call_overhead=0.0)
    s, h, d = 1 << 16, 32, 128
    for p, bw, lat in ((8, H100.intra_bw, H100.latency_intra), (16, H100.inter_bw, H100.latency_inter)):
        c = attention_cost(strategy="ring", layout="zigzag", world=p, seq_len=s, heads=h, kv_heads=h, head_dim=d,
                           profile=fast_compute)
        kv = 2 * (s // p) * h * d * 2
        assert c.comm_fwd_s == pytest.approx((p - 1) * (lat + kv / (bw * H100.link_efficiency)))
        assert c.fwd_s == pytest.approx(c.comm_fwd_s, rel=1e-6)  # no compute to hide behind
        hidden = attention_cost(strategy="ring", layout="zigzag", world=p, seq_len=s, heads=h, kv_heads=h, head_dim=d,
                                profile=slow_compute)
        assert hidden.fwd_s == pytest.approx(hidden.compute_fwd_s, rel=1e-6)  # comm hidden


def test_ulysses_does_not_overlap() -> None:
    p, s, h, d = 8, 1 << 16, 32, 128
    c = attention_cost(strategy="ulysses", layout="zigzag", world=p, seq_len=s, heads=h, kv_heads=h, head_dim=d,
                       profile=dataclasses.replace(H100, call_overhead=0.0))
    assert c.fwd_s == pytest.approx(c.compute_fwd_s + c.comm_fwd_s, rel=1e-9)


def test_step_memory_and_checkpointing() -> None:
    m = MODELS["llama2_7b"]
    a = step_cost(m, H100, gpus=64, seq_len=1 << 17, strategy="ring", cp=8, checkpointing=False)
    b = step_cost(m, H100, gpus=64, seq_len=1 << 17, strategy="ring", cp=8, checkpointing=True)
    assert b.memory_bytes < a.memory_bytes and b.step_s > a.step_s
    assert a.breakdown["states_bytes"] == pytest.approx(16 * m.params() / 64 + 4 * m.layer_matmul_params())
    # activations scale with tokens per rank
    c = step_cost(m, H100, gpus=64, seq_len=1 << 17, strategy="ring", cp=16, checkpointing=False)
    assert c.breakdown["activation_bytes"] == pytest.approx(a.breakdown["activation_bytes"] / 2)
    assert a.tokens_per_s == pytest.approx(a.dp * (1 << 17) / a.step_s)
    assert 0 < a.mfu < H100.mfu_dense


def test_candidates_respect_heads_and_nodes() -> None:
    m = dataclasses.replace(MODELS["llama2_7b"], heads=12, kv_heads=4, hidden=1536, head_dim=128)
    cands = candidates(m, H100, 64, 1 << 17)
    assert all(cp % 12 == 0 or 12 % cp == 0 for s, _, cp, _ in cands if s == "ulysses")
    assert not any(s == "ulysses" and cp == 8 for s, _, cp, _ in cands)  # 12 heads do not split 8 ways
    assert all(u <= H100.gpus_per_node and 12 % u == 0 for s, _, _, u in cands if s == "hybrid")
    lin = candidates(MODELS["tnl_7b"], H100, 8, 1 << 16)
    assert {s for s, *_ in lin} == {"none", "lasp2"}


def _synthetic_records(profile, rng: random.Random) -> list[dict]:
    from longreach.planning.plan import predict

    recs = []
    for world, strategy, layout in [(1, "none", "contiguous"), (2, "ring", "zigzag"), (2, "ring", "contiguous"),
                                    (2, "ulysses", "zigzag"), (2, "allgather", "contiguous")]:
        for s in (1024, 2048, 4096, 8192):
            o = {"strategy": strategy, "layout": layout, "world": world, "seq_len": s, "batch": 1, "heads": 4,
                 "kv_heads": 2, "head_dim": 32, "density": causal_density(s), "causal": True, "dtype_bytes": 4,
                 "ulysses_degree": None}
            f, fb = predict(o, profile)
            f *= math.exp(rng.gauss(0, 0.05))
            fb *= math.exp(rng.gauss(0, 0.05))
            t = lambda x: {"median": x, "min": x, "max": x, "iqr": 0.0, "spread": 0.0, "all": [x]}  # noqa: E731
            recs.append({"kind": "sweep_point", "status": "ok", "density": o["density"],
                         "config": {"backend": "cpu", "mask": "causal", "strategy": strategy, "layout": layout,
                                    "seq_len": s, "world": world, "ulysses_degree": None, "batch": 1, "heads": 4,
                                    "kv_heads": 2, "head_dim": 32, "dtype": "float32", "device": "cpu"},
                         "time_fwd": t(f), "time_fwd_bwd": t(fb), "comm": {}, "hardware": {}})
    return recs


def test_calibration_recovers_known_profile(tmp_path: Path) -> None:
    truth = get_profile("cpu_gloo").with_calibration({"attention_flops": 3e10, "bwd_efficiency": 0.6,
                                                     "call_overhead": 5e-4, "latency_intra": 1e-4, "overlap": 0.7})
    recs = _synthetic_records(truth, random.Random(0))
    res = calibrate(recs, get_profile("cpu_gloo"))
    assert res["n_fit"] == res["n_held_out"] == 10
    assert res["median_err_held_out"] < 0.08  # 5 % noise
    assert res["params"]["attention_flops"] == pytest.approx(3e10, rel=0.15)
    assert res["params"]["bwd_efficiency"] == pytest.approx(0.6, rel=0.15)
    # the CLI path: fit, save, plan with the saved fit
    rf = tmp_path / "r.jsonl"
    rf.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cal = tmp_path / "cal.json"
    assert main(["--calibrate", str(rf), "--json", str(cal)]) == 0
    plan_json = tmp_path / "plan.json"
    assert main(["--hardware", "cpu_gloo", "--calibration", str(cal), "--model", "llama2_7b", "--seq-len", "8k",
                 "--gpus", "2", "--json", str(plan_json)]) == 0
    assert json.loads(plan_json.read_text())["profile"]["attention_flops"] == pytest.approx(
        json.loads(cal.read_text())["params"]["attention_flops"])


def test_split_halves_alternates() -> None:
    obs = [{"key": (k,), "seq_len": s} for k in ("a", "b") for s in (1, 2, 3, 4)]
    fit, held = split_halves(obs)
    assert len(fit) == len(held) == 4
    assert sorted(o["seq_len"] for o in fit if o["key"] == ("a",)) == [1, 3]
    assert sorted(o["seq_len"] for o in fit if o["key"] == ("b",)) == [2, 4]


def test_plan_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plan.json"
    assert main(["--model", "llama2_7b", "--seq-len", "128k,1M", "--gpus", "64,1024", "--json", str(out),
                 "--published"]) == 0
    text = capsys.readouterr().out
    assert "PREDICTIONS" in text and "PUBLISHED" in text
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4
    for r in rows:
        b = r["best"]
        assert b is not None and b["fits"] and b["memory_bytes"] <= H100.memory_bytes
        assert b["cp"] * b["dp"] == r["gpus"]
        assert all(o["tokens_per_s"] <= b["tokens_per_s"] * (1 + 1e-12) for o in r["per_strategy"].values())
    assert parse_tokens("1M") == 1 << 20 and parse_tokens("128k") == 131072
    with pytest.raises(UserError, match="hardware"):
        main(["--hardware", "tpu"])
    with pytest.raises(UserError, match="token count"):
        main(["--seq-len", "lots"])


def test_peak_flops_lookup() -> None:
    import torch

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 989e12 / 2
    assert peak_flops(None) is None and peak_flops("AMD EPYC") is None


# ------------------------------------------------------------------------------------- memory model
def _measured_per_token(shape: dict, layers: int, dtype, tile: int, seq: int = 32) -> dict[str, float]:
    import torch

    from longreach.bench.memory import SavedBytesMeter
    from longreach.models import ModelConfig, build_model
    from longreach.model_setup import apply_sequence_tiling

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, n_layers=layers, max_seq_len=64, **shape)).to(dtype)
    apply_sequence_tiling(model, tile)
    ids = torch.randint(0, 64, (1, seq))
    with SavedBytesMeter(model) as meter:
        model(ids, labels=ids, loss_chunk_size=16)[0].backward()
    return {k: v / seq for k, v in meter.bytes.items()}


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_memory_terms_are_the_measured_saved_bytes(dtype_name: str) -> None:
    """The planner's per-token terms equal what autograd keeps on our Llama (two depths separate the
    per-layer from the per-model part), on shapes that move every coefficient."""
    import torch

    from longreach.planning.costmodel import ModelShape

    dtype = getattr(torch, dtype_name)
    e = torch.tensor([], dtype=dtype).element_size()
    for shp in ({"dim": 32, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 48},
                {"dim": 64, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 48},
                {"dim": 32, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 96}):
        ms = ModelShape(layers=1, hidden=shp["dim"], heads=shp["n_heads"], kv_heads=shp["n_kv_heads"],
                        ffn=shp["ffn_hidden"], vocab=64)
        for tile in (0, 8):
            one, two = (_measured_per_token(shp, n, dtype, tile) for n in (1, 2))
            per_layer = {k: two[k] - one[k] for k in one}
            per_model = {k: 2 * one[k] - two[k] for k in one}
            want_layer = ms.saved_bytes_per_token(e, tiled=bool(tile))
            want_model = ms.model_saved_bytes_per_token(e, tiled=bool(tile))
            # RoPE tables are saved inside attention; the model counts them per model
            rope = want_model.pop("rope")
            want_model_as_measured = {**want_model, "attention": rope}
            got_layer = {k: v for k, v in per_layer.items() if v}
            got_model = {k: v for k, v in per_model.items() if v}
            assert got_layer == want_layer, (shp, tile, got_layer, want_layer)
            assert got_model == want_model_as_measured, (shp, tile, got_model, want_model_as_measured)


def test_plan_reaches_4m_on_8_and_16m_on_32_h100(capsys: pytest.CaptureFixture) -> None:
    from longreach.planning.plan import plan_table

    m = MODELS["llama3_8b"]
    for gpus, s in ((8, 4 << 20), (32, 16 << 20)):
        row = plan_table(m, H100, [s], [gpus], zero=3)[0]
        b = row["best"]
        assert b is not None and b.fits and b.memory_bytes <= H100.memory_bytes
        assert b.memory.checkpointing and b.memory.offload and b.memory.tiled  # what gets it there
        assert b.breakdown["mem_host"] <= H100.host_memory_bytes
    assert main(["--model", "llama3_8b", "--gpus", "8", "--seq-len", "4M"]) == 0
    out = capsys.readouterr().out
    assert "ckpt+offload+tiled" in out and "offloads" in out and "pinned host memory" in out
    assert "states" in out and "largest backward phase" in out


def test_offload_and_tiling_lower_memory_and_cost_time() -> None:
    from longreach.planning.costmodel import MemoryOptions

    m = MODELS["llama3_8b"]
    kw = dict(gpus=8, seq_len=1 << 20, strategy="ring", cp=8)
    plain = step_cost(m, H100, memory=MemoryOptions(checkpointing=True), **kw)
    tiled = step_cost(m, H100, memory=MemoryOptions(checkpointing=True, tiled=True), **kw)
    off = step_cost(m, H100, memory=MemoryOptions(checkpointing=True, tiled=True, offload=True), **kw)
    assert plain.memory_bytes > tiled.memory_bytes > off.memory_bytes
    assert plain.step_s < tiled.step_s <= off.step_s
    n = (1 << 20) / 8
    # offload keeps two block inputs on the device and the rest on the host
    assert off.breakdown["mem_checkpoints"] == pytest.approx(2 * n * m.hidden * 2)
    assert off.breakdown["mem_host"] == pytest.approx(m.layers * n * m.hidden * 2)


def test_validate_shares_the_plan_memory_model_and_refuses_what_does_not_fit() -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "longreach.launchers.cli", "launch", "configs/tnl_7b.yaml", "--validate",
                         "--dry-run", "--world-size", "128"], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "h100_sxm:" in ok.stdout and ": fits" in ok.stdout and "FSDP2" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "longreach.launchers.cli", "launch", "configs/tnl_7b.yaml", "--validate",
                          "--dry-run", "--world-size", "128", "--engine.options={fsdp: false}"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "DOES NOT FIT" in bad.stdout and "states" in bad.stdout
    assert "does not fit h100_sxm" in bad.stderr


def test_dry_run_estimate_is_memory_per_rank() -> None:
    from longreach.engines import as_engine_config
    from longreach.planning.costmodel import MemoryOptions, memory_per_rank
    from longreach.launchers.dryrun import estimate_memory, model_shape
    from workers.trainer import tiny_job

    cfg = tiny_job(**{"train.activation_checkpointing": True, "model.sequence_tile": 16,
                      "model.checkpoint_offload": True, "train.seq_len": 64})
    engine = as_engine_config({"kind": "native", "options": {"fsdp": True}})
    got = estimate_memory(params=1000, params_per_rank=250, cfg=cfg, engine=engine, n_shards=4)
    want = memory_per_rank(model_shape(cfg.model), tokens=64, zero=3, shards=4, params=1000.0, dtype_bytes=4,
                           opts=MemoryOptions(checkpointing=True, offload=True, tiled=True, tile_tokens=16,
                                              loss_chunk=cfg.train.loss_chunk_size))
    assert got["total"] == want["total"] and got["host"] == want["host"] > 0


@pytest.mark.parametrize("recipe,world", [("longlora_llama2_7b_32k", 8), ("sinklora_llama3_8b_64k", 16)])
def test_hf_recipes_validate_within_h100(recipe: str, world: int) -> None:
    from longreach.launchers.dryrun import validate_config

    rep = validate_config(f"configs/{recipe}.yaml", world)
    assert rep.fits and rep.memory["total"] <= rep.capacity and rep.dp * rep.cp == world
    assert any("frozen at 2 B/param" in n for n in rep.notes)
    # the same recipe squeezed onto a 16 GB device is refused, with the breakdown in the report
    small = dataclasses.replace(H100, name="gpu16", memory_bytes=16e9)
    PROFILES["gpu16"] = small
    try:
        assert not validate_config(f"configs/{recipe}.yaml", world, hardware="gpu16").fits
    finally:
        del PROFILES["gpu16"]
    with pytest.raises(UserError, match="--world-size"):
        validate_config(f"configs/{recipe}.yaml", world + 1)


def test_plan_and_dry_run_share_one_memory_model() -> None:
    """``longreach plan`` (step_cost) and ``launch --validate`` (run_memory) give the same peak bytes for the
    same model, sequence, degrees and memory options; a frozen base and a wider residual stream add to it."""
    from longreach.planning.costmodel import MemoryOptions, run_memory, step_cost

    shape, prof = MODELS["llama3_8b"], get_profile("h100_sxm")
    for strategy, cp, u in (("ring", 8, None), ("ulysses", 8, None), ("hybrid", 16, 4)):
        opts = MemoryOptions(checkpointing=True, tiled=True, tile_tokens=4096)
        planned = step_cost(shape, prof, gpus=32, seq_len=262144, strategy=strategy, cp=cp, ulysses_degree=u,
                            zero=3, memory=opts)
        validated = run_memory(shape, seq_len=262144, micro_batch=1, cp=cp, strategy=strategy, layout="zigzag",
                               ulysses_degree=u, opts=opts, zero=3, shards=32, profile=prof)
        assert validated["total"] == planned.memory_bytes, strategy
        frozen = run_memory(shape, seq_len=262144, micro_batch=1, cp=cp, strategy=strategy, layout="zigzag",
                            ulysses_degree=u, opts=opts, zero=3, shards=32, profile=prof, frozen_params=1e9,
                            stream_bytes=4)
        n, h = 262144 // cp, shape.hidden
        assert frozen["states"] - validated["states"] == 2.0 * 1e9 / 32  # bf16 frozen copies, sharded by ZeRO-3
        assert frozen["checkpoints"] == 2 * validated["checkpoints"]  # block inputs at 4 B instead of 2
        assert frozen["per_model"] - validated["per_model"] == n * h * 2 * 4  # 4 hidden states 2 B wider
