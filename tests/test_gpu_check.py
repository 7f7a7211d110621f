"""``longreach bench gpu --dry`` and ``longreach bench kernels``: the plumbing at toy sizes on CPU."""
from __future__ import annotations

import json

import pytest
import torch

from longreach.bench import gpu_check
from longreach.bench import kernels as bench_kernels
from longreach.errors import UserError
from test_slices import _one_thread  # noqa: F401 - autouse: one torch thread for these toy sizes


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--dry", "--skip", "tests", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["dry"] is True and "tests" not in res
    sizes = gpu_check.DRY
    assert [r["seq_len"] for r in res["throughput"]] == list(sizes.seq_lens)
    for r in res["throughput"]:
        assert r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak for a CPU
        per_token = gpu_check.model_flops_per_token(r["params_non_embedding"], sizes.n_layers, sizes.n_heads,
                                                    sizes.dim // sizes.n_heads, r["seq_len"])
        assert r["tflops"] == pytest.approx(per_token * r["seq_len"] / r["seconds_per_step"] / 1e12)
        assert torch.isfinite(torch.tensor(r["loss"]))
    masks = [r["mask"] for r in res["kernels"] if "ideal" in r]
    assert masks == list(bench_kernels.MASK_NAMES)
    assert all(r["median"] > 0 and r["target"] > r["ideal"] for r in res["kernels"] if "ideal" in r)


def test_flops_formula():
    # 6N plus causal attention: 12 · layers · (S/2) · H · D per token
    assert gpu_check.model_flops_per_token(10, 2, 4, 8, 100) == 60 + 2 * 12 * 50 * 32


def test_gpu_check_refuses_without_gpu_or_with_bad_section(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--dry"):
            gpu_check.main(["--json", str(tmp_path / "x.json")])
    with pytest.raises(UserError, match="--skip"):
        gpu_check.main(["--dry", "--skip", "tset"])
    with pytest.raises(UserError, match="does not exist"):
        gpu_check.main(["--dry", "--json", str(tmp_path / "no" / "x.json")])


def test_bench_kernels_interleaves_rounds_and_reports_spread(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert bench_kernels.main(["--seq-len", "256", "--heads", "2", "--head-dim", "16", "--masks", "s2_varlen,ssa",
                               "--rounds", "2", "--window", "32", "--block", "32", "--compare", "cpu_sparse",
                               "--json", str(out)]) == 0
    rows = {r["mask"]: r for r in json.loads(out.read_text())["masks"]}
    for name in ("s2_varlen", "ssa"):
        r = rows[name]
        assert r["ideal"] == pytest.approx(r["density"] / (257 / 512))
        for col in ("fwd:slices", "fwdbwd:slices", "fwd:cpu_sparse", "fwdbwd:cpu_sparse"):
            assert r[col]["rounds"] == 2 and r[col]["min"] <= r[col]["median"] <= r[col]["max"]
    assert "median [min-max]" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown backend"):
        bench_kernels.main(["--backend", "nope", "--masks", "ssa"])
