"""Memory at the floor: sequence-tiled MLP/experts/norms, checkpoint offload, saved-bytes counts, bench memory.

Exactness: every memory mode gives the plain model's loss and gradients in float64, in one process
and under ring, Ulysses and hybrid context parallelism (4 gloo ranks). Counts: the bytes kept for
backward and moved to host are exact figures, checked against what the shapes say they must be.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch

from longreach.bench.memory import COMPONENTS, SavedBytesMeter, fit_line
from longreach.models import ModelConfig, build_model
from longreach.model_setup import CheckpointOffload, apply_activation_checkpointing, apply_sequence_tiling
from longreach.models.config import MoEOptions
from longreach.testing import run_ranks

MODES = {  # name -> (sequence_tile, activation_checkpointing, checkpoint_offload)
    "tiled": (5, False, False),
    "ckpt+offload": (0, True, True),
    "ckpt+offload+tiled": (7, True, True),
    "ckpt+tiled": (4, True, False),
}


def _cfg(**over: Any) -> ModelConfig:
    kw: dict[str, Any] = dict(vocab_size=37, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64)
    return ModelConfig(**{**kw, **over})


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss, _ = model(ids, labels=labels, loss_chunk_size=7)
    aux = getattr(model, "aux_loss", None)
    (loss + aux if aux is not None else loss).backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads


def _assert_same(name: str, got: tuple[torch.Tensor, dict], want: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0, msg=lambda m: f"{name} loss: {m}")
    assert got[1].keys() == want[1].keys()
    for pname, g in want[1].items():
        torch.testing.assert_close(got[1][pname], g, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name} {pname}.grad: {m}")


@pytest.mark.parametrize("ffn_type", ["swiglu", "moe"])
def test_memory_modes_match_plain_model_float64(ffn_type: str) -> None:
    moe = MoEOptions(experts=4, top_k=2) if ffn_type == "moe" else None
    torch.manual_seed(0)
    base = build_model(_cfg(ffn_type=ffn_type, moe=moe)).double()
    ids, labels = torch.randint(0, 37, (2, 23)), torch.randint(0, 37, (2, 23))  # 23: ragged last tile
    labels[0, 3] = -100
    want = _loss_and_grads(copy.deepcopy(base), ids, labels)
    modes = MODES if ffn_type == "swiglu" else {k: MODES[k] for k in ("tiled", "ckpt+offload+tiled")}
    for name, (tile, ckpt, offload) in modes.items():
        model = copy.deepcopy(base)
        tiled = apply_sequence_tiling(model, tile)
        assert tiled == (2 * 3 + 1 if tile else 0)  # mlp/experts + 2 norms per block, and the final norm
        off = CheckpointOffload() if offload else None
        if ckpt:
            apply_activation_checkpointing(model, offload=off)
        _assert_same(f"{ffn_type} {name}", _loss_and_grads(model, ids, labels), want)
        if off is not None:  # one hidden state per block, out and back exactly once; block 0 prefetched
            assert off.bytes_offloaded == off.bytes_restored == 2 * 2 * 23 * 32 * 8
            assert off.prefetched == 1


def test_tiled_experts_rows_meet_their_expert() -> None:
    from longreach.mixtures.moe import SwiGLUExperts
    from longreach.models.base import tile_experts

    torch.manual_seed(1)
    experts = SwiGLUExperts(3, 8, 16).double()
    x = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    counts = [4, 0, 7]
    want = experts(x, counts)
    tiled = tile_experts(copy.deepcopy(experts), 3)
    got = tiled(x, counts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    g_want = torch.autograd.grad(want.sum(), x)[0]
    g_got = torch.autograd.grad(got.sum(), x)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_saved_bytes_are_the_floor_with_checkpointing(dtype: torch.dtype) -> None:
    """Exact counts: checkpointed blocks keep one hidden state each; offload moves exactly those to host."""
    s, layers, dim = 48, 3, 32
    el = torch.tensor([], dtype=dtype).element_size()
    ids, labels = torch.randint(0, 37, (1, s)), torch.randint(0, 37, (1, s))
    totals = {}
    for name, (tile, ckpt, offload) in {"plain": (0, False, False), **MODES}.items():
        torch.manual_seed(0)
        model = build_model(_cfg(n_layers=layers)).to(dtype)
        apply_sequence_tiling(model, tile)
        off = CheckpointOffload() if offload else None
        if ckpt:
            apply_activation_checkpointing(model, offload=off)
        with SavedBytesMeter(model) as meter:
            loss, _ = model(ids, labels=labels, loss_chunk_size=16)
            loss.backward()
        b = meter.bytes
        totals[name] = meter.total
        if ckpt:
            assert b["attention"] == b["mlp"] == 0, b  # recomputed, nothing kept
            assert b["checkpoint"] == (0 if offload else layers * s * dim * el), b
            assert b["rope"] == 2 * s * (dim // 4 // 2) * 4, b  # cos and sin, float32, once for all blocks
        if offload:
            assert off.bytes_offloaded == layers * s * dim * el
        if tile and ckpt:  # the final norm + loss keep only the last hidden state (labels stay the caller's)
            assert b["norms"] == 0 and b["loss"] == s * dim * el, b
    assert totals["plain"] > totals["tiled"] > totals["ckpt+tiled"] > totals["ckpt+offload+tiled"]
    per_layer_device = totals["ckpt+offload+tiled"] / s / layers
    assert per_layer_device <= 1.1 * dim * el


def test_meter_attributes_components_without_checkpointing() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg()).double()
    ids = torch.randint(0, 37, (1, 16))
    with SavedBytesMeter(model) as meter:
        model(ids, labels=ids, loss_chunk_size=8)[0].backward()
    assert set(meter.bytes) == set(COMPONENTS)
    for comp in ("attention", "mlp", "norms", "loss"):
        assert meter.bytes[comp] > 0, meter.bytes
    # the MLP keeps its input, gate and up outputs, their product's factors: at least 3 ffn-wide tensors
    assert meter.bytes["mlp"] >= 2 * 3 * 16 * 48 * 8
    assert meter.bytes["checkpoint"] == 0


def test_fit_line_recovers_a_line() -> None:
    a, b = fit_line([1.0, 2.0, 4.0, 8.0], [10.0 + 3.0 * x for x in (1.0, 2.0, 4.0, 8.0)])
    assert abs(a - 10.0) < 1e-9 and abs(b - 3.0) < 1e-9


def test_offload_needs_checkpointing() -> None:
    from longreach.errors import UserError
    from longreach.model_setup import parallelize
    from workers.trainer import tiny_job

    cfg = tiny_job(**{"model.checkpoint_offload": True})
    with pytest.raises(UserError, match="train.activation_checkpointing"):
        parallelize(build_model(cfg.model), cfg, None)


# ------------------------------------------------------------------------------ context parallelism
def cp_modes_worker(rank: int, world_size: int) -> list[str]:
    """Each (strategy, memory mode) against the plain single-rank model, float64, on 4 ranks (and one
    combination through the FSDP2 engine)."""
    from longreach.models.config import ModelConfig as MC
    from longreach.parallel.config import ParallelConfig
    from longreach.engines import as_engine_config, build_engine
    from longreach.model_setup import dp_cp_group, parallelize
    from longreach.trainer import build_mesh, forward_backward
    from workers.trainer import SyntheticBatches, _close, tiny_job

    failures = []
    batch = SyntheticBatches(vocab=37, seq_len=24, batch=2, seed=3, ignore_every=3).make(0)
    torch.manual_seed(11)
    base = build_model(tiny_job().model).double()
    ref_cfg = tiny_job(**{"train.seq_len": 24, "attention.backend": "reference", "train.loss_chunk_size": 7})
    ref = parallelize(copy.deepcopy(base), ref_cfg, None)
    ref_loss, _, _ = forward_backward(ref, [batch], cfg=ref_cfg, mesh=None, step=0, device=torch.device("cpu"))
    mesh = build_mesh(ParallelConfig(cp=world_size), world_size, torch.device("cpu"))[0]
    runs = [(strategy, u, name, None) for strategy, u in (("ring", None), ("ulysses", None), ("hybrid", 2))
            for name in MODES]
    runs.append(("ring", None, "ckpt+offload+tiled", {"kind": "native", "options": {"fsdp": True}}))
    for strategy, u, name, engine_cfg in runs:
        tile, ckpt, offload = MODES[name]
        tag = f"{strategy} {name}" + (" FSDP2" if engine_cfg else "")
        cfg = tiny_job(**{"train.seq_len": 24, "attention.backend": "reference", "train.loss_chunk_size": 7,
                          "parallel.cp": world_size, "parallel.strategy": strategy, "parallel.ulysses_degree": u,
                          "train.activation_checkpointing": ckpt,
                          "model.sequence_tile": tile, "model.checkpoint_offload": offload})
        assert isinstance(cfg.model, MC)
        # DDP, or FSDP2 sharding the tiled, offloaded, checkpointed blocks
        model = parallelize(copy.deepcopy(base), cfg, mesh)
        engine = build_engine(as_engine_config(engine_cfg or "native"), model, lambda ps: torch.optim.SGD(ps, lr=0.0),
                              group=dp_cp_group(mesh), mesh=mesh)
        model = engine.model
        loss, _, _ = forward_backward(model, [batch], cfg=cfg, mesh=mesh, step=0, device=torch.device("cpu"),
                                      engine=engine)
        if abs(loss - ref_loss) > 1e-12 * abs(ref_loss):
            failures.append(f"[{tag}] loss {loss!r} != {ref_loss!r}")
        inner = getattr(model, "module", model)
        got = {n.replace("._checkpoint_wrapped_module", ""): p for n, p in inner.named_parameters()}
        for pname, p in ref.named_parameters():
            g = got[pname].grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP2 shards
            msg = _close(pname + ".grad", g, p.grad, 1e-9)
            if msg:
                failures.append(f"[{tag}] {msg}")
    return failures


def test_memory_modes_exact_under_ring_ulysses_hybrid() -> None:
    failures = [f for per_rank in run_ranks(cp_modes_worker, 4, timeout=600) for f in per_rank]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------- the bench
def test_bench_memory_saved_table(capsys: pytest.CaptureFixture[str]) -> None:
    from longreach.bench.memory import main

    assert main(["--strategies", "single", "--seq-len", "32", "--layers", "2", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "floor = hidden × 4 B = 256 B" in out
    row = next(line for line in out.splitlines() if "ckpt+offload+tiled" in line)
    assert float(row.split()[-1]) == 256.0  # host: one float32 hidden state per token per layer


def test_bench_memory_rejects_bad_input() -> None:
    from longreach.errors import UserError
    from longreach.launchers.cli import main

    assert main(["bench", "memory", "--strategies", "ringg"]) == 2
    from longreach.bench.memory import main as bench_main

    with pytest.raises(UserError, match="--budget"):
        bench_main(["--peak", "--budget", "lots"])


@pytest.mark.gpu
def test_offload_on_cuda_is_exact_and_frees_device_memory() -> None:
    """Pinned host copies on a side stream: same gradients, less device memory held between fwd and bwd."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = build_model(_cfg(dim=256, n_heads=4, n_kv_heads=4, ffn_hidden=512, n_layers=8, max_seq_len=8192)).to(dev)
    ids = torch.randint(0, 37, (1, 8192), device=dev)
    held = {}
    results = {}
    for name, offload in (("ckpt", False), ("ckpt+offload", True)):
        model = copy.deepcopy(base)
        off = CheckpointOffload() if offload else None
        apply_activation_checkpointing(model, offload=off)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss, _ = model(ids, labels=ids, loss_chunk_size=1024)
        torch.cuda.synchronize()
        held[name] = torch.cuda.memory_allocated() - before
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        if off is not None:
            assert off.bytes_offloaded == off.bytes_restored == 8 * 8192 * 256 * 4
            assert off.prefetched == 7
    torch.testing.assert_close(results["ckpt+offload"][0], results["ckpt"][0])
    for n, g in results["ckpt"][1].items():
        torch.testing.assert_close(results["ckpt+offload"][1][n], g)
    assert held["ckpt"] - held["ckpt+offload"] >= 6 * 8192 * 256 * 4  # at most two block inputs stay


def test_peak_worker_live_bytes_grow_with_length_and_checkpointing_lowers_them() -> None:
    from longreach.bench.memory import Shape, peak_worker

    shape = dataclasses.asdict(Shape(dim=32, layers=2, ffn=64, vocab=64))
    plain = peak_worker(0, 1, shape, "single", False, [64, 256], "float32", 64)
    ckpt = peak_worker(0, 1, shape, "single", True, [64, 256], "float32", 64)
    hf = peak_worker(0, 1, shape, "hf", False, [256], "float32", 64)
    assert [r["seq_len"] for r in plain] == [64, 256]
    assert 0 < plain[0]["peak_live"] < plain[1]["peak_live"] and plain[1]["rss"] >= plain[0]["rss"] > 0
    assert ckpt[1]["peak_live"] < plain[1]["peak_live"]
    assert hf[0]["peak_live"] > 0
