"""Rank functions of the LASP tests (run by :func:`longreach.testing.run_ranks`).

* :func:`lasp_matrix` checks LASP-1/LASP-2 against single-rank lightning attention over a matrix of
  variants, layouts, dtypes and process groups, and returns the failing cases.
* :func:`lasp_documents_matrix` checks LASP-1/LASP-2 with packed documents against each document run
  alone (:func:`longreach.bench.lasp_ranks.lasp_documents_errors`) within tolerances.
* :func:`tnl_recipe_runs` trains the tiny TransNormerLLM recipe through the trainer (LASP on cp ranks).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longreach.bench.lasp_ranks import lasp_documents_errors, lasp_inputs, rel_error
from longreach.configio import load_config, resolve_config_path
from longreach.job import JobConfig
from longreach.kernels.lightning import lightning_attention
from longreach.metrics import read_metrics
from longreach.parallel import shard_sequence
from longreach.parallel.lasp import linear_cp_attention
from longreach.parallel.layouts import layout_multiple
from longreach.trainer import train
from workers.trainer import SyntheticBatches



def lasp_matrix(rank: int, world_size: int) -> list[str]:
    """Every LASP case on this world; returns descriptions of the cases whose output or gradients differ."""
    failures: list[str] = []
    groups: list[tuple[str, Any]] = [("world", None)]
    if world_size == 4:
        # two cp groups of two ranks each: exercises group-rank → global-rank mapping
        sub = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        groups.append(("pairs", sub[rank // 2]))
    for gname, group in groups:
        p = world_size if group is None else dist.get_world_size(group)
        for layout in ("contiguous", "zigzag"):
            for variant in ("lasp1", "lasp2"):
                for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
                    chunk = 5  # odd chunk length
                    seq_len = layout_multiple(layout, p) * chunk
                    q, k, v, dout, decay = lasp_inputs(seq_len, dtype, seed=seq_len + p)
                    # single-rank oracle: float64 naive over the whole sequence
                    leaves = [x.double().requires_grad_() for x in (q, k, v)]
                    ref = lightning_attention(*leaves, decay.double(), backend="naive")
                    ref_grads = torch.autograd.grad((ref * dout.double()).sum(), leaves)
                    local = [shard_sequence(x, layout=layout, group=group).requires_grad_() for x in (q, k, v)]
                    out = linear_cp_attention(*local, decay, variant=variant, layout=layout, group=group)
                    grads = torch.autograd.grad((out * shard_sequence(dout, layout=layout, group=group)).sum(), local)
                    checks = {"out": (out, ref)} | {f"d{n}": (g, r) for n, g, r in zip("qkv", grads, ref_grads)}
                    for name, (got, want) in checks.items():
                        err = rel_error(got, shard_sequence(want, layout=layout, group=group))
                        if not err < tol or got.dtype != dtype:
                            failures.append(f"rank {rank} group={gname} {variant} {layout} {dtype} {name}: "
                                            f"rel err {err:.2e} (dtype {got.dtype})")
    return failures


def lasp_documents_matrix(rank: int, world_size: int) -> list[str]:
    """:func:`lasp_documents_errors` against tolerances (1e-10 float64, 1e-5 float32); returns the failures."""
    tol = {"float64": 1e-10, "float32": 1e-5}
    return [f"rank {rank} {r['variant']} {r['layout']} {r['dtype']} cu={r['offsets']} {r['name']}: "
            f"rel err {r['rel_err']:.2e} (dtype ok: {r['dtype_ok']})"
            for r in lasp_documents_errors(rank, world_size) if not (r["rel_err"] < tol[r["dtype"]] and r["dtype_ok"])]


def tnl_recipe_runs(rank: int, world_size: int, runs: list[list[str]],
                    documents: list[bool] | None = None) -> list[list[float]]:
    """Train ``configs/tnl_tiny_cpu.yaml`` through ``longreach.trainer.train`` once per override list.

    Data are the trainer tests' deterministic arithmetic sequences (bit-identical everywhere); where
    ``documents[i]`` is true, run i packs two documents per row (``cu_seqlens`` and per-document
    positions). Returns the per-step losses of each run from its ``metrics.jsonl`` (rank 0; other ranks
    return empty lists).
    """
    curves = []
    for i, overrides in enumerate(runs):
        cfg = load_config(JobConfig, resolve_config_path("tnl_tiny_cpu"), overrides)
        data = SyntheticBatches(vocab=cfg.model.vocab_size, seq_len=cfg.train.seq_len,
                                batch=cfg.train.micro_batch_size, seed=cfg.run.seed,
                                documents=bool(documents and documents[i]))
        summary = train(cfg, data=data)
        curves.append([float(r["loss"]) for r in read_metrics(summary["metrics"])] if rank == 0 else [])
    return curves
