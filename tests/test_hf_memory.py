"""Memory at the floor on the HF fine-tuning path: ``train.sequence_tile`` and ``train.checkpoint_offload``.

A tiny HF Llama under the LongLoRA recipe (LoRA also inside the MLP, trainable embeddings and norms) is
parallelized by the same ``longreach.model_setup.parallelize`` step ``longreach finetune`` uses; every memory mode gives
the plain fine-tune's loss and LoRA / embedding / norm gradients in float64, in one process and under a
2-rank ring (zigzag), and a whole fine-tune with both modes gives the plain run's losses step by step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from longreach.testing import run_ranks  # noqa: E402

TARGET = 32  # tokens per sequence: twice the tiny Llama's context of 16
MODES = {  # name -> (train.sequence_tile, train.activation_checkpointing, train.checkpoint_offload)
    "tiled": (5, False, False),
    "ckpt+offload": (0, True, True),
    "ckpt+offload+tiled": (7, True, True),
}
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # LoRA inside the tiled MLP too


def _save_base(folder: Path) -> str:
    from transformers import LlamaForCausalLM

    from workers.hf import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return str(folder)


def _job(base: str, *, cp: int, tile: int = 0, ckpt: bool = False, offload: bool = False, **kw: Any) -> Any:
    from longreach.hf.config import FinetuneConfig, FTAttention, FTTrain, HFSource
    from longreach.hf.recipes import RecipeConfig
    from longreach.parallel.config import ParallelConfig

    return FinetuneConfig(
        hf=HFSource(path=base, dtype="float64"), recipe=RecipeConfig(target_len=TARGET, lora_targets=LORA_TARGETS),
        attention=FTAttention(backend="reference"),
        parallel=ParallelConfig(cp=cp, strategy="ring", layout="zigzag"),
        train=FTTrain(lr=5e-3, warmup_steps=1, loss_chunk_size=7, sequence_tile=tile, activation_checkpointing=ckpt,
                      checkpoint_offload=offload), **kw)


def _loss_and_grads(cfg: Any, mesh: Any, batch: Any, engine_cfg: dict | None = None
                    ) -> tuple[float, dict[str, torch.Tensor], Any]:
    """One forward/backward of the fine-tune model built and parallelized as ``longreach finetune`` does
    (through ``longreach.engines`` when ``engine_cfg`` is given)."""
    from longreach.hf.model import build_hf_model
    from longreach.engines import as_engine_config, build_engine, unwrap
    from longreach.model_setup import dp_cp_group, parallelize
    from longreach.trainer import forward_backward

    torch.manual_seed(1)  # LoRA initialisation
    model = build_hf_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # LoRA B starts at zero: make it non-zero so LoRA A gets a gradient as well
        gen = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model = parallelize(model, cfg, mesh)
    engine = None
    if mesh is not None:  # DDP, or the configured engine
        engine = build_engine(as_engine_config(engine_cfg or "native"), model, lambda ps: torch.optim.SGD(ps, lr=0.0),
                              group=dp_cp_group(mesh), mesh=mesh)
        model = engine.model
    loss, _, _ = forward_backward(model, [batch], cfg=cfg, mesh=mesh, step=0, device=torch.device("cpu"), engine=engine)
    inner = unwrap(model)
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in inner.named_parameters()
             if p.requires_grad}
    grads = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}  # FSDP2 shards
    return loss, grads, inner


def _compare(tag: str, got: tuple[float, dict], want: tuple[float, dict]) -> list[str]:
    failures = []
    if abs(got[0] - want[0]) > 1e-12 * abs(want[0]):
        failures.append(f"[{tag}] loss {got[0]!r} != {want[0]!r}")
    if got[1].keys() != want[1].keys():
        failures.append(f"[{tag}] trainable parameters differ: {sorted(got[1].keys() ^ want[1].keys())}")
    for name, g in want[1].items():
        h = got[1].get(name)
        if h is None or g is None or not torch.allclose(h, g, rtol=1e-10, atol=1e-13):
            err = None if h is None or g is None else float((h - g).abs().max())
            failures.append(f"[{tag}] {name}.grad differs (max abs diff {err}; ref norm "
                            f"{None if g is None else float(g.norm())})")
    return failures


def _modes_against_plain(base: str, cp: int, mesh: Any, runs: list[tuple[str, str, dict | None]]) -> list[str]:
    """Each (strategy, memory mode, engine) on ``cp`` ranks against the plain one-rank fine-tune; also checks
    what each mode did (modules tiled, bytes offloaded)."""
    from longreach.hf.patch import shift_labels
    from longreach.trainer import Batch

    ids = torch.randint(0, 97, (2, TARGET), generator=torch.Generator().manual_seed(3))
    batch = Batch(input_ids=ids, labels=shift_labels(ids))
    batch.labels[0, 5] = -100
    loss, grads, _ = _loss_and_grads(_job(base, cp=1), None, batch)
    want = (loss, grads)
    failures = []
    kinds = {"lora_A", "lora_B", "embed_tokens", "norm"}
    seen = {k for k in kinds if any(k in n for n in grads)}
    if seen != kinds or any(float(g.abs().max()) == 0 for g in grads.values()):
        failures.append(f"reference: trainable kinds {sorted(seen)}; zero gradients "
                        f"{[n for n, g in grads.items() if float(g.abs().max()) == 0]}")
    for strategy, name, engine_cfg in runs:
        tile, ckpt, offload = MODES[name]
        tag = f"cp={cp} {strategy} {name}" + (f" {engine_cfg}" if engine_cfg else "")
        cfg = _job(base, cp=cp, tile=tile, ckpt=ckpt, offload=offload)
        cfg.parallel.strategy = strategy
        loss, grads, inner = _loss_and_grads(cfg, mesh, batch, engine_cfg)
        failures += _compare(tag, (loss, grads), want)
        layers = inner.layers
        tiled = [m for m in inner.modules() if getattr(m, "sequence_tile", 0) == tile and tile]
        if tile and len(tiled) != 3 * len(layers) + 1:  # mlp + 2 norms per block, and the final norm
            failures.append(f"[{tag}] {len(tiled)} modules tiled, want {3 * len(layers) + 1}")
        off = inner.checkpoint_offload if ckpt else None
        local = TARGET // cp
        # one float64 hidden state [2, S/cp, 32] per block, out and back once; block 0's brought back ahead
        if offload and not (off.bytes_offloaded == off.bytes_restored == len(layers) * 2 * local * 32 * 8
                            and off.prefetched == 1):
            failures.append(f"[{tag}] offloaded {off.bytes_offloaded} B, restored {off.bytes_restored} B, "
                            f"prefetched {off.prefetched}")
    return failures


def test_hf_memory_modes_match_plain_finetune_one_rank(tmp_path: Path) -> None:
    failures = _modes_against_plain(_save_base(tmp_path / "base"), 1, None, [("ring", name, None) for name in MODES])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype,pure_bf16", [("bfloat16", False), ("bfloat16", True)])
def test_hf_saved_bytes_at_the_floor(tmp_path: Path, dtype: str, pure_bf16: bool) -> None:
    """What the HF fine-tune keeps for backward with checkpointing + tiling (exact counts, per token): one
    hidden state per block (none on the device with offload), nothing of attention or MLP, the tiled final
    norm's input, the loss's input, log-sum-exp and label, the token id. Hidden states are in the residual
    stream's precision: fp32 under bf16 compute when the embeddings train as fp32 master weights (what
    ``launch --validate`` assumes for HF recipes), bf16 with ``hf.pure_bf16``."""
    from longreach.bench.memory import SavedBytesMeter
    from longreach.hf.model import build_hf_model
    from longreach.hf.patch import shift_labels
    from longreach.model_setup import parallelize

    base = _save_base(tmp_path / "base")
    ids = torch.randint(0, 97, (1, TARGET), generator=torch.Generator().manual_seed(3))
    e, h, layers = (2 if pure_bf16 else 4), 32, 2
    for offload in (False, True):
        cfg = _job(base, cp=1, tile=8, ckpt=True, offload=offload)
        cfg.hf.dtype, cfg.hf.pure_bf16 = dtype, pure_bf16
        model = parallelize(build_hf_model(cfg, torch.device("cpu")), cfg, None)
        # bf16 compute beside the trainable parameters, as the trainer runs it (train.precision=bf16)
        with SavedBytesMeter(model) as meter, torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
            loss, _ = model(ids, None, None, labels=shift_labels(ids), loss_chunk_size=7)
        loss.backward()
        per_token = {k: v / TARGET for k, v in meter.bytes.items() if v}
        assert per_token == {**({} if offload else {"checkpoint": layers * e * h}), "norms": e * h,
                             "loss": e * h + 4 + 8, "embedding": 8}, (dtype, offload, per_token)
        if offload:
            assert model.checkpoint_offload.bytes_offloaded == layers * e * h * TARGET


def ring_modes_worker(rank: int, world_size: int, base: str) -> list[str]:
    from longreach.parallel.config import ParallelConfig
    from longreach.trainer import build_mesh

    mesh = build_mesh(ParallelConfig(cp=world_size), world_size, torch.device("cpu"))[0]
    runs = [("ring", name, None) for name in MODES] + [
        ("ulysses", "ckpt+offload+tiled", None),
        ("ring", "ckpt+offload+tiled", {"kind": "native", "options": {"fsdp": True}})]
    return _modes_against_plain(base, world_size, mesh, runs)


def test_hf_memory_modes_match_plain_finetune_cp2(tmp_path: Path) -> None:
    base = _save_base(tmp_path / "base")
    failures = [f for per_rank in run_ranks(ring_modes_worker, 2, args=(base,), timeout=600) for f in per_rank]
    assert not failures, "\n".join(failures)


def test_finetune_with_tiling_and_offload_matches_plain_run(tmp_path: Path) -> None:
    """``longreach finetune`` end to end (two optimizer steps, one rank): the same losses and exported weights."""
    from transformers import AutoModelForCausalLM

    from longreach.hf.config import FTData, FTRun
    from longreach.hf.train import finetune

    base = _save_base(tmp_path / "base")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 97, TARGET * 4))
    runs = {}
    for name, (tile, ckpt, offload) in {"plain": (0, False, False), "both": MODES["ckpt+offload+tiled"]}.items():
        cfg = _job(base, cp=1, tile=tile, ckpt=ckpt, offload=offload,
                   data=FTData(source="tokens", tokens_path=str(tmp_path / "tokens.npy")),
                   run=FTRun(out_dir=str(tmp_path / name), steps=2))
        runs[name] = finetune(cfg)
    assert len(runs["plain"]["losses"]) == 2
    np.testing.assert_allclose(runs["both"]["losses"], runs["plain"]["losses"], rtol=1e-12, atol=0)
    plain, both = (AutoModelForCausalLM.from_pretrained(runs[n]["export"], torch_dtype=torch.float64).state_dict()
                   for n in ("plain", "both"))
    assert sorted(plain) == sorted(both)  # no wrapper names in the export
    for name, w in plain.items():
        torch.testing.assert_close(both[name], w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(plain["model.norm.weight"], torch.ones_like(plain["model.norm.weight"]))  # it trained


def test_offload_without_checkpointing_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from longreach.configio import load_config
    from longreach.errors import ConfigError
    from longreach.hf.config import FinetuneConfig
    from longreach.hf.cli import finetune_main

    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"hf: {{path: {tmp_path}}}\nrecipe: {{target_len: 64}}\ntrain: {{checkpoint_offload: true}}\n")
    with pytest.raises(ConfigError, match=r"train\.checkpoint_offload .*train\.activation_checkpointing=true"):
        load_config(FinetuneConfig, cfg)
    assert finetune_main([str(cfg), f"--run.out_dir={tmp_path / 'run'}"]) == 2  # the command: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.checkpoint_offload" in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "run").exists()
    cfg.write_text(f"hf: {{path: {tmp_path}}}\nrecipe: {{target_len: 64}}\ntrain: {{activation_checkpointing: true}}\n")
    with pytest.raises(ConfigError, match=r"train\.sequence_tile must be >= 0"):
        load_config(FinetuneConfig, cfg, ["--train.sequence_tile=-1"])
    ok = load_config(FinetuneConfig, cfg, ["--train.checkpoint_offload=true", "--train.sequence_tile=256"])
    assert ok.train.checkpoint_offload and ok.train.sequence_tile == 256


# ------------------------------------------------------------------------------ longreach launch --validate
def test_validate_accounts_for_tiling_and_offload(capsys: pytest.CaptureFixture[str]) -> None:
    """``launch --validate`` of an HF recipe feeds train.sequence_tile / train.checkpoint_offload to the planner's
    memory model: the tiled MLP working set, two checkpointed inputs on the device and the rest on the host,
    hidden states at 4 B/element under fp32 trainable embeddings and 2 with hf.pure_bf16 (as measured above)."""
    from longreach.launchers.cli import main
    from longreach.launchers.dryrun import validate_config
    from longreach.planning.costmodel import MODELS, MemoryOptions, memory_per_rank

    recipe, world, tile = "configs/sinklora_llama3_8b_64k.yaml", 16, 4096
    shape, n = MODELS["llama3_8b"], 65536 // 4  # tokens per rank: target_len / parallel.cp
    h, layers = shape.hidden, shape.layers
    modes = {"ckpt": [], "ckpt+tiled": [f"--train.sequence_tile={tile}"],
             "ckpt+offload+tiled": [f"--train.sequence_tile={tile}", "--train.checkpoint_offload=true"]}
    for pure in (False, True):
        stream = 2 if pure else 4  # bytes per element of the residual stream (trainable embeddings: fp32)
        reps = {name: validate_config(recipe, world, over + [f"--hf.pure_bf16={str(pure).lower()}"])
                for name, over in modes.items()}
        for name, rep in reps.items():
            tiled, offload = "tiled" in name, "offload" in name
            opts = MemoryOptions(checkpointing=True, tiled=tiled, offload=offload, tile_tokens=tile, loss_chunk=4096)
            want = memory_per_rank(shape, tokens=n, opts=opts, zero=2, shards=world, params=1.0)  # bf16 stream
            for part in ("phase_mlp", "phase_loss"):
                assert rep.memory[part] == want[part], (name, part)
            assert rep.memory["checkpoints"] == (2 if offload else layers) * n * stream * h, (pure, name)
            assert rep.memory["host"] == (layers * n * stream * h if offload else 0), (pure, name)
            # final norm and loss inputs, the two flowing gradients; the tiled final norm keeps its own input
            extra = n * h * ((stream - 2) * 4 + (stream if tiled else 0))
            assert rep.memory["per_model"] == want["per_model"] + extra, (pure, name)
            assert any(n.startswith(f"activations: {name} ") for n in rep.notes), rep.notes
        assert reps["ckpt+tiled"].memory["phase_mlp"] < reps["ckpt"].memory["phase_mlp"]
        assert len({rep.memory["phase_attention"] for rep in reps.values()}) == 1  # the ring's buffers: unchanged
        assert reps["ckpt"].memory["total"] > reps["ckpt+tiled"].memory["total"] > reps["ckpt+offload+tiled"].memory["total"]
    # a user error: one line, exit 2
    assert main(["launch", "--validate", "--dry-run", "--world-size", str(world), "finetune", recipe,
                 "--train.activation_checkpointing=false", "--train.checkpoint_offload=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.checkpoint_offload" in err[0] and "train.activation_checkpointing" in err[0], err
