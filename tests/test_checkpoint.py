"""Checkpoints: bit-identical resume, atomic saves, keep-last-N, resharding 2 -> 1 / 4 ranks (DDP and
FSDP2), config-hash and model-shape checks, corrupted files, weights_only loading."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from longreach.checkpoint import (CheckpointConfig, CheckpointManager, NonFiniteStateError, find_checkpoint,
                                  verify_checkpoint)
from longreach.errors import UserError
from longreach.testing import run_ranks
from workers import faults as w


def _losses(records):
    return [r["loss"] for r in records]


def test_resume_is_bit_identical_single_process(tmp_path):
    full = w.train_loop(tmp_path / "a", steps=6, save_every=3)
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-00000006")
    again = w.train_loop(tmp_path / "a", steps=6, save_every=3)  # resumes from step 3 (RNG, data, sched, optim)
    assert [r["step"] for r in again] == [4, 5, 6]
    assert _losses(again) == _losses(full[3:])  # exact equality: bit for bit on CPU
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]


def test_rng_matters_so_resume_test_is_meaningful(tmp_path):
    # without restoring the RNG (dropout) the continuation differs: guards against a vacuous test
    full = w.train_loop(tmp_path / "a", steps=4, save_every=2)
    mgr = CheckpointManager(CheckpointConfig(), tmp_path / "a", config_hash="tiny")
    rank_file = mgr.latest().parent / "step-00000002" / "rank-00000.pt"
    payload = torch.load(rank_file, weights_only=True)
    payload["_rng"]["torch"] = torch.manual_seed(123).get_state()
    torch.save(payload, rank_file)
    meta_file = rank_file.parent / "meta.json"  # a deliberate edit: drop the checksums so it still loads
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "files"}))
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-00000004")
    again = w.train_loop(tmp_path / "a", steps=4, save_every=2)
    assert _losses(again) != _losses(full[2:])


def test_tmp_folders_ignored_and_cleaned_keep_last(tmp_path):
    model = torch.nn.Linear(3, 2)
    mgr = CheckpointManager(CheckpointConfig(keep_last=2), tmp_path, config_hash="h")
    (tmp_path / "checkpoints" / "step-00000099.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000099.tmp" / "junk").write_text("half written")
    assert mgr.latest() is None
    for s in (1, 2, 3, 4):
        mgr.save(s, {"model": model})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004"]
    assert mgr.latest().name == "step-00000004"
    assert find_checkpoint(tmp_path) == mgr.latest()


def test_async_save_then_close(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    mgr = CheckpointManager(CheckpointConfig(async_save=True), tmp_path, config_hash="h")
    final = mgr.save(5, {"model": model, "optimizer": opt})
    mgr.close()
    assert final.is_dir() and not Path(str(final) + ".tmp").exists()
    torch.manual_seed(1)
    other = torch.nn.Linear(4, 4)
    other_opt = torch.optim.AdamW(other.parameters())
    assert mgr.load({"model": other, "optimizer": other_opt}) == 5
    assert torch.equal(other.weight, model.weight)
    assert torch.equal(other_opt.state[other.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])


def _saved(tmp_path, config=None, hash_="h"):
    model = torch.nn.Linear(3, 2)
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, config_hash=hash_, config=config)
    path = mgr.save(1, {"model": model, "trainer": {"tokens": 7}})
    return model, path


def test_config_hash_mismatch_names_keys(tmp_path):
    old = {"model": {"dim": 8}, "parallel": {"cp": 2}, "train": {"lr": 0.1}}
    _saved(tmp_path, config=old, hash_="h1")
    new = {"model": {"dim": 8}, "parallel": {"cp": 2}, "train": {"lr": 0.2}}
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, config_hash="h2", config=new)
    with pytest.raises(UserError, match=r"step-00000001.*train\.lr: 0\.1 -> 0\.2"):
        mgr.load({"model": torch.nn.Linear(3, 2)})
    forced = CheckpointManager(CheckpointConfig(ignore_config_mismatch=True), tmp_path, config_hash="h2", config=new)
    assert forced.load({"model": torch.nn.Linear(3, 2)}) == 1
    # a different parallel layout is what resharding is for: accepted
    reshard = {"model": {"dim": 8}, "parallel": {"cp": 4}, "train": {"lr": 0.1}}
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, config_hash="h3", config=reshard)
    trainer: dict = {}
    assert mgr.load({"model": torch.nn.Linear(3, 2), "trainer": trainer}) == 1
    assert trainer == {"tokens": 7}
    # without config dicts only the hash can be compared
    with pytest.raises(UserError, match="different config"):
        CheckpointManager(CheckpointConfig(), tmp_path / "x", config_hash="zz").load(
            {"model": torch.nn.Linear(3, 2)}, path=tmp_path / "checkpoints" / "step-00000001")


def test_different_model_shape_is_user_error(tmp_path):
    _saved(tmp_path)
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, config_hash="h")
    with pytest.raises(UserError, match=r"step-00000001 holds a different model shape: weight is \[2, 3\]"):
        mgr.load({"model": torch.nn.Linear(4, 2)})
    with pytest.raises(UserError, match="different model: .*missing"):
        mgr.load({"model": torch.nn.Sequential(torch.nn.Linear(3, 2))})


@pytest.mark.parametrize("damage", ["meta", "rank_file", "dcp_data", "dcp_metadata"])
def test_corrupted_checkpoint_is_user_error(tmp_path, damage):
    model, path = _saved(tmp_path)
    if damage == "meta":
        (path / "meta.json").write_text("{not json")
    elif damage == "rank_file":
        (path / "rank-00000.pt").write_bytes(b"garbage")
    elif damage == "dcp_data":
        f = next(p for p in (path / "model").iterdir() if p.suffix == ".distcp")
        f.write_bytes(f.read_bytes()[:10])
    else:
        (path / "model" / ".metadata").write_bytes(b"\x00\x01")
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, config_hash="h")
    with pytest.raises(UserError, match=r"step-00000001.*(corrupted|damaged|not a longreach)"):
        mgr.load({"model": torch.nn.Linear(3, 2), "trainer": {}})


def test_torch_load_only_with_weights_only(tmp_path, monkeypatch):
    _saved(tmp_path)
    import longreach.checkpoint as ck

    seen = []
    real = torch.load

    def spy(*a, **k):
        seen.append(k.get("weights_only"))
        return real(*a, **k)

    monkeypatch.setattr(ck.torch, "load", spy)
    CheckpointManager(CheckpointConfig(), tmp_path, config_hash="h").load({"model": torch.nn.Linear(3, 2),
                                                                           "trainer": {}})
    assert seen and all(v is True for v in seen)


def test_load_path_and_missing_load_path(tmp_path):
    model, path = _saved(tmp_path / "src")
    mgr = CheckpointManager(CheckpointConfig(load_path=str(tmp_path / "src")), tmp_path / "dst", config_hash="h")
    m = torch.nn.Linear(3, 2)
    assert mgr.load({"model": m}) == 1 and torch.equal(m.weight, model.weight)
    bad = CheckpointManager(CheckpointConfig(load_path=str(tmp_path / "nope")), tmp_path / "d2", config_hash="h")
    with pytest.raises(UserError, match=r"checkpoint.load_path: .*nope does not exist"):
        bad.load({"model": m})


def test_reshard_2_to_1_and_4_ranks(tmp_path):
    """A 2-rank checkpoint (DDP; FSDP2-sharded) resumes on 1 and 4 ranks with the same losses."""
    kw = {"dropout": 0.0}  # per-rank RNG streams differ across world sizes; dropout off to compare losses
    fsdp = {"dropout": 0.0, "engine": {"kind": "native", "fsdp": True}}
    d2, f2 = str(tmp_path / "ddp2"), str(tmp_path / "fsdp2")
    res2 = run_ranks(w.matrix_worker, 2, args=([(d2, 6, 3, kw), (f2, 6, 3, fsdp)], d2))
    two, two_f = res2[0][d2], res2[0][f2]
    errs = [r["errors"] for r in res2]
    assert all(e[0].startswith("shape: checkpoint") and "different model shape" in e[0] for e in errs), errs
    assert all(e[1].startswith("hash: checkpoint") and "different config" in e[1] for e in errs), errs
    ck_ddp = str(tmp_path / "ddp2" / "checkpoints" / "step-00000003")
    ck_fsdp = str(tmp_path / "fsdp2" / "checkpoints" / "step-00000003")
    # 1 rank (no process group), from each checkpoint
    one = w.train_loop(tmp_path / "one", steps=6, save_every=0, load_path=ck_ddp, **kw)
    one_f = w.train_loop(tmp_path / "one_f", steps=6, save_every=0, load_path=ck_fsdp, **kw)
    d4, f4 = str(tmp_path / "four"), str(tmp_path / "four_f")
    res4 = run_ranks(w.matrix_worker, 4, args=([(d4, 6, 0, {**kw, "load_path": ck_ddp}),
                                                (f4, 6, 0, {**fsdp, "load_path": ck_fsdp})],))
    four, four_f = res4[0][d4], res4[0][f4]
    ref = _losses(two[3:])
    assert math.isclose(_losses(two_f)[0], _losses(two)[0], rel_tol=1e-6)
    for name, got in (("1 rank", one), ("1 rank from FSDP2", one_f), ("4 ranks", four), ("4 ranks FSDP2", four_f)):
        assert [r["step"] for r in got] == [4, 5, 6], name
        assert torch.allclose(torch.tensor(_losses(got)), torch.tensor(ref), rtol=1e-5, atol=1e-6), (name, got, ref)


def test_trainable_only_saves_adapters_and_keeps_base_weights(tmp_path):
    """checkpoint.trainable_only (LoRA): frozen weights are not saved; resume restores the trainable ones
    and the optimizer, and leaves the frozen ones as the model builder made them."""
    import torch.distributed.checkpoint as dcp

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = w.DropNet(dropout=0.0)
        model.inp.requires_grad_(False)  # "base" weights
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    model, opt = build(0)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    cfg = CheckpointConfig(trainable_only=True)
    path = CheckpointManager(cfg, tmp_path, config_hash="lora").save(1, {"model": model, "optimizer": opt})
    saved = dcp.FileSystemReader(str(path / "model")).read_metadata().state_dict_metadata
    assert not any(k.startswith("model.inp.") for k in saved) and "model.out.weight" in saved
    fresh, fresh_opt = build(1)  # other random weights, frozen ones included
    base = fresh.inp.weight.detach().clone()
    assert CheckpointManager(cfg, tmp_path, config_hash="lora").load({"model": fresh, "optimizer": fresh_opt}) == 1
    assert torch.equal(fresh.out.weight, model.out.weight) and torch.equal(fresh.inp.weight, base)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def _two_saves(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    mgr = CheckpointManager(CheckpointConfig(), tmp_path, config_hash="h")
    mgr.save(1, {"model": model, "trainer": {"step": 1}})
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    mgr.save(2, {"model": model, "trainer": {"step": 2}})
    return mgr, first


def test_same_size_damage_falls_back_to_previous_checkpoint(tmp_path, caplog):
    """A .distcp file altered in place (same size) fails its sha256; resuming uses step 1, loudly."""
    mgr, first = _two_saves(tmp_path)
    ck = tmp_path / "checkpoints"
    f = next((ck / "step-00000002" / "model").glob("*.distcp"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"step-00000002: model/.*\.distcp fails its sha256 check"):
        verify_checkpoint(ck / "step-00000002")
    with pytest.raises(UserError, match="fails its sha256 check"):  # an explicit path never falls back
        mgr.load({"model": torch.nn.Linear(3, 2), "trainer": {}}, path=ck / "step-00000002")
    model, trainer = torch.nn.Linear(3, 2), {}
    with caplog.at_level("WARNING", logger="longreach.checkpoint"):
        assert mgr.load({"model": model, "trainer": trainer}) == 1
    assert trainer == {"step": 1} and all(torch.equal(model.state_dict()[k], v) for k, v in first.items())
    assert "moved it aside to step-00000002.damaged" in caplog.text and "step-00000001" in caplog.text
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000001", "step-00000002.damaged"]
    # both damaged: one error naming the run's checkpoints, nothing moved
    (ck / "step-00000001" / "rank-00000.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=r"no intact checkpoint in .*checkpoints: .*rank-00000\.pt has 1 bytes"):
        mgr.load({"model": model, "trainer": trainer})
    assert (ck / "step-00000001").is_dir()


def test_nonfinite_state_is_never_saved(tmp_path):
    mgr, _ = _two_saves(tmp_path)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    next(iter(opt.state.values()))["exp_avg_sq"][0, 0] = float("inf")
    with pytest.raises(NonFiniteStateError, match=r"step 3: non-finite values in optimizer state exp_avg_sq; "
                                                  r"not saving .*last complete checkpoint is step-00000002"):
        mgr.save(3, {"model": model, "optimizer": opt})
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(NonFiniteStateError, match="non-finite values in bias"):
        mgr.save(3, {"model": model})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_disk_space_and_write_failures_leave_no_tmp(tmp_path, monkeypatch):
    import longreach.checkpoint as ck

    mgr, _ = _two_saves(tmp_path)
    need = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "step-00000002").rglob("*") if f.is_file())
    real_usage = shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=100))
    with pytest.raises(UserError, match=rf"not enough free space to save checkpoint .*step-00000003\.tmp: "
                                        rf"about {need} bytes needed, 100 free"):
        mgr.save(3, {"model": torch.nn.Linear(3, 2)})
    monkeypatch.setattr(ck.shutil, "disk_usage", real_usage)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*step-00000003\.tmp \(OSError: \[Errno 28\] No space "
                                        r"left on device\); about \d+ bytes needed, \d+ free; the partial folder was "
                                        r"removed \(the last complete checkpoint, step-00000002, is intact\)"):
        mgr.save(3, {"model": torch.nn.Linear(3, 2)})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_interrupted_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    mgr, _ = _two_saves(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through longreach.faults.Interrupted

    monkeypatch.setattr(mgr, "_dcp_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(3, {"model": torch.nn.Linear(3, 2)})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]



@pytest.mark.parametrize("trainable_only", [False, True])
def test_tied_parameter_is_written_once_and_resumes_exactly(tmp_path, monkeypatch, trainable_only):
    """A tied weight is saved under one name only (its bytes once, one optimizer state); a fresh model
    resumes bit for bit with the tie intact; a checkpoint holding both names (written before) still loads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    import longreach.checkpoint as ckpt_mod
    from workers.tied import batches, build, train_steps

    ids = batches()  # [4 steps, 2, 5]
    cfg = CheckpointConfig(trainable_only=trainable_only)
    model, opt = build(0, trainable_only=trainable_only)
    train_steps(model, opt, ids[:2])
    state = {"model": model, "optimizer": opt}
    path = CheckpointManager(cfg, tmp_path / "new", config_hash="t").save(2, state)
    with monkeypatch.context() as m:  # the same state written as before: both names of the tied weight
        m.setattr(ckpt_mod, "_untie", lambda msd: {})
        old = CheckpointManager(cfg, tmp_path / "old", config_hash="t").save(2, state)
    ref = train_steps(model, opt, ids[2:])

    saved = dcp.FileSystemReader(str(path / "model")).read_metadata().state_dict_metadata
    tensors = {k: m for k, m in saved.items() if isinstance(m, TensorStorageMetadata)}
    model_keys = {k for k in tensors if k.startswith("model.")}
    assert model_keys == ({"model.emb.weight"} if trainable_only else {"model.emb.weight", "model.mid.weight",
                                                                        "model.mid.bias"})
    assert not any("head" in k for k in saved), sorted(saved)
    assert {k for k in tensors if k.startswith("optim.state.") and k.endswith(".exp_avg")} == \
        {f"optim.state.{k.removeprefix('model.')}.exp_avg" for k in model_keys}
    unique = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    assert sum(math.prod(tensors[k].size) for k in model_keys) == sum(p.numel() for p in unique.values())
    old_keys = dcp.FileSystemReader(str(old / "model")).read_metadata().state_dict_metadata
    assert "model.head.weight" in old_keys  # the older layout, for the compatibility load below

    for src in (tmp_path / "new", tmp_path / "old"):
        fresh, fresh_opt = build(1, trainable_only=trainable_only)
        assert not torch.equal(fresh.emb.weight, model.emb.weight)
        mgr = CheckpointManager(cfg, src, config_hash="t")
        assert mgr.load({"model": fresh, "optimizer": fresh_opt}) == 2
        assert fresh.head.weight is fresh.emb.weight  # still tied
        assert train_steps(fresh, fresh_opt, ids[2:]) == ref, src.name  # bit for bit
        for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), (src.name, name)


def test_tied_parameter_under_fsdp2_is_written_once_and_resumes_exactly(tmp_path):
    """2 FSDP2-sharded ranks (DTensor state): the tied weight is saved once, lean and full, and a fresh
    sharded model resumes with the reference losses bit for bit, the tie intact."""
    from workers.tied import fsdp_resume

    res = run_ranks(fsdp_resume, 2, args=(str(tmp_path),))
    for rank, got in enumerate(res):
        for lean, r in got.items():
            assert r["ref"] == r["got"] and len(r["ref"]) == 2, (rank, lean, r)
            assert r["tied"], (rank, lean)
            assert r["saved"] == (["model.emb.weight"] if lean else
                                  ["model.emb.weight", "model.mid.bias", "model.mid.weight"]), (rank, lean, r)
