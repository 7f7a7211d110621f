"""Whole journeys through the command line: every command consumes what the others produce.

Fast tests check each link (model sources, export, ``checkpoint.init_from``, upcycle from run folders,
expert weights gathered from every rank) on checkpoints written by the real ``CheckpointManager``; the
``slow`` tests run the journeys themselves through ``longreach`` commands only (2 ranks through
``longreach launch`` where the journey trains under context parallelism).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from longreach.checkpoint import CheckpointConfig, CheckpointManager  # noqa: E402
from longreach.configio import to_dict  # noqa: E402
from longreach.errors import UserError  # noqa: E402
from longreach.launchers.cli import main as cli  # noqa: E402
from longreach.models import ModelConfig, build_model  # noqa: E402
from longreach.models.config import MoEOptions  # noqa: E402

torch.set_num_threads(1)

LLAMA = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64)
MOE = dict(LLAMA, ffn_type="moe", moe=MoEOptions(experts=4, top_k=2, expert_parallel=True))


def _run_folder(root: Path, model_cfg: ModelConfig, *, seed: int = 0, step: int = 3) -> tuple[Path, torch.nn.Module]:
    """A run folder holding one DCP checkpoint of a freshly initialised model (written by CheckpointManager)."""
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    mgr = CheckpointManager(CheckpointConfig(), root, config_hash="h", config={"model": to_dict(model_cfg)})
    mgr.save(step, {"model": model})
    return root, model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids) @ model.output_weight().t()  # [B, S, V]


def test_sources_resolve_every_kind(tmp_path):
    from longreach.sources import load_model, resolve_source

    run, model = _run_folder(tmp_path / "run", ModelConfig(**LLAMA))
    step = run / "checkpoints" / "step-00000003"
    assert resolve_source(run).kind == "run" and resolve_source(run).path == step
    assert resolve_source(step).kind == "step" and resolve_source(step).step == 3
    assert "step 3" in resolve_source(run).describe()
    ids = torch.randint(0, 61, (1, 9))
    torch.testing.assert_close(_logits(load_model(resolve_source(run)), ids), _logits(model, ids))
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model source"):
        resolve_source(tmp_path / "empty")


def test_export_hf_and_safetensors_round_trip(tmp_path, capsys):
    """A DCP run → HF LlamaForCausalLM (logits equal ours) and → safetensors (dtype default and --dtype)."""
    from transformers import LlamaForCausalLM

    from longreach.sources import load_model, read_state_dict, resolve_source

    run, model = _run_folder(tmp_path / "run", ModelConfig(**LLAMA))
    ids = torch.randint(0, 61, (1, 11))
    assert cli(["export", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    err = capsys.readouterr().err
    assert "reading run folder" in err and "gathered" in err and f"wrote {tmp_path / 'hf'}" in err
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert resolve_source(tmp_path / "hf").kind == "hf"
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")  # an HF source's tokenizer files travel along
    assert cli(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "hf2"), "--dtype", "float16"]) == 0
    assert (tmp_path / "hf2" / "tokenizer_config.json").read_text() == "{}"
    hf2 = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf2")).eval()
    assert next(hf2.parameters()).dtype == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(hf2.float()(ids).logits, hf(ids).logits, rtol=0.02, atol=0.02)

    assert cli(["export", str(run), "--out", str(tmp_path / "st"), "--format", "safetensors"]) == 0
    assert resolve_source(tmp_path / "st").kind == "export"
    assert all(t.dtype == torch.float32 for t in read_state_dict(resolve_source(tmp_path / "st")).values())
    assert cli(["export", str(tmp_path / "st"), "--out", str(tmp_path / "bf"), "--dtype", "bfloat16",
                "--format", "safetensors"]) == 0
    assert cli(["export", str(tmp_path / "bf"), "--out", str(tmp_path / "bf2")]) == 0  # default: the source's
    bf2 = read_state_dict(resolve_source(tmp_path / "bf2"))
    assert all(t.dtype == torch.bfloat16 for t in bf2.values())
    with torch.no_grad():
        torch.testing.assert_close(_logits(load_model(resolve_source(tmp_path / "bf2"), dtype=torch.float32), ids),
                                   _logits(model.to(torch.bfloat16).float(), ids), rtol=0.05, atol=0.05)

    # a non-empty destination is kept unless --force
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep")
    capsys.readouterr()
    assert cli(["export", str(run), "--out", str(tmp_path / "busy")]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "busy" / "precious.txt").read_text() == "keep"
    assert cli(["export", str(run), "--out", str(tmp_path / "busy"), "--force"]) == 0
    assert not (tmp_path / "busy" / "precious.txt").exists() and not (tmp_path / "busy.tmp").exists()


def test_export_hf_refuses_other_architectures(tmp_path, capsys):
    run, _ = _run_folder(tmp_path / "run", ModelConfig(**LLAMA, parallel_block=True))
    assert cli(["export", str(run), "--out", str(tmp_path / "x"), "--format", "hf"]) == 2
    assert "--format safetensors" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli(["export", str(run), "--out", str(tmp_path / "x")]) == 0  # auto: safetensors
    assert (tmp_path / "x" / "model.safetensors").is_file() and (tmp_path / "x" / "config.yaml").is_file()


def test_init_from_is_weights_only_and_checked(tmp_path):
    from longreach.sources import init_weights

    run, model = _run_folder(tmp_path / "run", ModelConfig(**LLAMA))
    torch.manual_seed(5)
    fresh = build_model(ModelConfig(**LLAMA))
    src = init_weights(fresh, run)
    assert src.kind == "run"
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    other = build_model(ModelConfig(**{**LLAMA, "dim": 48}))
    with pytest.raises(UserError, match=r"checkpoint.init_from.*shape"):
        init_weights(other, run)
    with pytest.raises(ValueError, match="exclude each other"):
        CheckpointConfig(init_from=str(run), load_path=str(run))


def test_upcycle_identical_run_folders_reproduces_the_seed(tmp_path):
    """``longreach upcycle --seeds RUN RUN`` (run folders, not files): the mixture's logits equal the seed's."""
    from longreach.sources import load_model, resolve_source

    run, seed = _run_folder(tmp_path / "seed", ModelConfig(**LLAMA, parallel_block=True, tie_embeddings=True))
    step = run / "checkpoints" / "step-00000003"
    assert cli(["upcycle", "--seeds", str(run), str(step), "--out", str(tmp_path / "bam"), "--share-kv"]) == 0
    mix = load_model(resolve_source(tmp_path / "bam"))
    assert mix.cfg.attention_type == "moa" and mix.cfg.ffn_type == "moe"
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(_logits(mix, ids), _logits(seed, ids), rtol=1e-5, atol=1e-5)
    assert cli(["upcycle", "--seeds", str(run), str(run), "--out", str(tmp_path / "bam")]) == 2  # not empty


def expert_parallel_checkpoint(rank: int, world: int, root: str) -> None:
    """Worker: a cp=2 expert-parallel MoE model (each rank holds E/2 experts) saved through DCP."""
    import torch.distributed as dist

    from longreach.job import JobConfig, TrainConfig
    from longreach.parallel.config import ParallelConfig
    from longreach.mixtures.expert_parallel import expert_shards
    from longreach.model_setup import parallelize
    from longreach.trainer import build_mesh

    cfg = ModelConfig(**MOE)
    torch.manual_seed(0)
    model = build_model(cfg)
    par = ParallelConfig(dp=1, cp=world)
    mesh, _, _ = build_mesh(par, world, torch.device("cpu"))
    model = parallelize(model, JobConfig(model=cfg, parallel=par, train=TrainConfig(seq_len=64)), mesh)
    assert expert_shards(model) is not None
    CheckpointManager(CheckpointConfig(), Path(root), config_hash="h",
                      config={"model": to_dict(cfg)}).save(1, {"model": model})
    dist.barrier()


def test_export_gathers_expert_parallel_weights_into_one_file(tmp_path):
    from safetensors.torch import load_file

    from longreach.testing import run_ranks

    run_ranks(expert_parallel_checkpoint, 2, args=(str(tmp_path / "run"),))
    assert cli(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    exported = load_file(str(tmp_path / "exp" / "model.safetensors"))
    torch.manual_seed(0)
    full = build_model(ModelConfig(**MOE)).state_dict()  # the same initialisation, all experts on one rank
    experts = [k for k in full if ".experts." in k]
    assert experts and sorted(exported) == sorted(full)
    for name, t in full.items():
        assert torch.equal(exported[name], t), name
    assert all(exported[k].shape[0] == 4 for k in experts)  # both ranks' halves, in expert order


def gather_worker(rank: int, world: int, spec: dict, root: str) -> dict:
    """Worker: wrap a model with an engine that shards it (FSDP2 / ZeRO-3), gather for export, then let
    rank 0 "write" for 4 s while rank 1 waits: on a 2 s-timeout group, then in ``run_on_rank0``."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from longreach.engines import as_engine_config, build_engine
    from longreach.hf.export import gather_full_parameters, run_on_rank0

    torch.manual_seed(0)
    model = build_model(ModelConfig(**LLAMA))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    eng = build_engine(as_engine_config(spec), model, lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    module = eng.module if hasattr(eng, "module") else eng.model
    # the engine's own checkpoint (DCP for FSDP2, DeepSpeed's format for ZeRO-3) is an export source too
    CheckpointManager(CheckpointConfig(), Path(root), config_hash="h",
                      config={"model": to_dict(ModelConfig(**LLAMA))}).save(1, eng.checkpoint_state())
    local = sum(p.numel() if not hasattr(p, "to_local") else p.to_local().numel() for p in module.parameters())
    local = sum(getattr(p, "ds_numel", 0) and p.ds_tensor.numel() for p in module.parameters()) or local
    n = gather_full_parameters(module)
    state = module.state_dict()
    equal = all(torch.equal(state[k].detach().cpu(), ref[k]) for k in ref)
    # a job whose collectives time out after 2 s: a plain barrier while rank 0 writes for 4 s fails ...
    short = dist.new_group(backend="gloo", timeout=timedelta(seconds=2))
    if rank == 0:
        time.sleep(4)
    try:
        dist.barrier(group=short)
        plain_timed_out = False
    except RuntimeError:
        plain_timed_out = True
    # ... run_on_rank0's wait does not
    t0 = time.monotonic()
    wrote = run_on_rank0(lambda: time.sleep(4) or "written")
    return {"replaced": n, "local": local, "total": sum(v.numel() for v in ref.values()), "equal": equal,
            "wrote": wrote, "waited": time.monotonic() - t0, "plain_timed_out": plain_timed_out}


@pytest.mark.parametrize("spec", [pytest.param({"kind": "native", "fsdp": True}, id="fsdp2"),
                                  pytest.param({"kind": "deepspeed", "zero_stage": 3}, id="zero3",
                                               marks=pytest.mark.slow)])
def test_gather_full_parameters_for_export(spec, tmp_path):
    from longreach.sources import read_state_dict, resolve_source
    from longreach.testing import run_ranks

    if spec["kind"] == "deepspeed":
        pytest.importorskip("deepspeed")
    res = run_ranks(gather_worker, 2, args=(spec, str(tmp_path / "run")))
    torch.manual_seed(0)
    ref = build_model(ModelConfig(**LLAMA)).state_dict()
    state = read_state_dict(resolve_source(tmp_path / "run"))  # FSDP2 shards / ZeRO-3 partitions, whole
    assert sorted(state) == sorted(ref) and all(torch.equal(state[k].float(), ref[k]) for k in ref)
    for r in res:
        assert r["replaced"] > 0 and r["local"] < r["total"] and r["equal"], r
    assert res[0]["wrote"] == "written" and res[1]["wrote"] is None and res[1]["waited"] >= 3.5
    assert res[1]["plain_timed_out"]  # what run_on_rank0 avoids


# ------------------------------------------------------------------------------------------ journeys
ENV = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
BIN = Path(sys.executable).with_name("longreach")


def _sh(*args: str, cwd: Path) -> str:
    """Run ``longreach ARGS`` in ``cwd``; its stdout (the test fails with stderr's tail on a non-zero exit)."""
    out = subprocess.run([str(BIN), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"longreach {' '.join(args)} -> {out.returncode}\n{out.stderr[-3000:]}"
    return out.stdout


def _json_line(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A journey folder (the commands' working directory) with its own tokenizer/shard cache."""
    root = tmp_path_factory.mktemp("journey")
    old = os.environ.get("LONGREACH_CACHE")
    os.environ["LONGREACH_CACHE"] = ENV["LONGREACH_CACHE"] = str(root / "cache")
    try:
        yield root
    finally:
        ENV.pop("LONGREACH_CACHE", None)
        if old is None:
            os.environ.pop("LONGREACH_CACHE", None)
        else:
            os.environ["LONGREACH_CACHE"] = old


def _cli_here(root: Path, *args: str) -> str:
    """``longreach ARGS`` in this process (single-process commands; paths relative to ``root``)."""
    import contextlib
    import io

    buf = io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(buf):
            rc = cli(list(args))
    finally:
        os.chdir(cwd)
    assert rc == 0, f"longreach {' '.join(args)} -> {rc}\n{buf.getvalue()[-2000:]}"
    return buf.getvalue()


def _results(root: Path, out: str) -> dict:
    return json.loads((root / out / "results.json").read_text())


@pytest.mark.slow
def test_journey_1_pretrain_export_finetune_eval_generate(work):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longreach.sources import load_tokenizer, resolve_source

    _sh("launch", "--nproc-per-node", "2", "demo", "--run.out_dir=pre", "--run.steps=2", "--run.save_every=0",
        "--model.max_seq_len=256", "--train.seq_len=256", "--model.n_layers=2", "--model.dim=64", cwd=work)
    _cli_here(work, "export", "pre", "--out", "pre/hf", "--format", "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(work / "pre/hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(work / "pre/hf"))
    sp = load_tokenizer(resolve_source(work / "pre"))
    text = "The pass key is 4711. Remember it."
    assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.max_position_embeddings == 256

    _sh("launch", "--nproc", "2", "finetune", "longlora_tiny_cpu", "--hf.path=pre/hf", "--run.out_dir=ft",
        "--run.steps=1", "--run.save_every=0", "--data.synthetic_documents=20", cwd=work)
    ft = AutoModelForCausalLM.from_pretrained(str(work / "ft/export"))
    assert ft.config.max_position_embeddings == 1024 and ft.config.rope_parameters["factor"] == 4.0
    np.save(work / "val.npy", np.asarray(sp.encode(" ".join(["The grass is green. The sky is blue."] * 150))))
    ev = ["--tokens", "val.npy", "--ppl-lengths", "256,1024", "--stride", "256", "--max-windows", "1",
          "--passkey-lengths", "256,1024", "--depths", "0.5", "--seeds", "1"]
    base_out = _cli_here(work, "eval", "pre/hf", *ev, "--beyond-positions", "--out", "eval_base")
    assert base_out.startswith("loaded HuggingFace folder pre/hf")
    ft_out = _cli_here(work, "eval", "ft", *ev, "--out", "eval_ft")
    assert ft_out.startswith("loaded run folder ft")
    cp = _sh("launch", "--nproc", "2", "eval", "ft", *ev, "--strategy", "ring", "--out", "eval_ft_cp", cwd=work)
    assert "on 2 ranks (ring, zigzag)" in cp
    one, two = _results(work, "eval_ft"), _results(work, "eval_ft_cp")
    for a, b in zip(one["perplexity"], two["perplexity"]):
        assert a["length"] == b["length"] and math.isclose(a["ppl"], b["ppl"], rel_tol=1e-4), (a, b)
    assert one["passkey"]["accuracy"] == two["passkey"]["accuracy"]
    base = _results(work, "eval_base")
    print("\njourney 1 (ppl, passkey):", [(r["length"], round(r["ppl"], 2)) for r in base["perplexity"]],
          base["passkey"]["accuracy"], "->", [(r["length"], round(r["ppl"], 2)) for r in one["perplexity"]],
          one["passkey"]["accuracy"])

    prompt = sp.encode("The pass key is 4711. Remember it. The pass key is")
    ids = ",".join(map(str, prompt))
    ours = _json_line(_cli_here(work, "generate", "pre/hf", "--prompt-ids", ids, "--max-new-tokens", "6", "--json"))
    native = _json_line(_cli_here(work, "generate", "pre", "--prompt-ids", ids, "--max-new-tokens", "6", "--json"))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours["ids"] == native["ids"] == ref[0, len(prompt):].tolist()


@pytest.mark.slow
def test_journey_2_bam(work):
    from longreach.sources import read_state_dict, resolve_source

    _sh("launch", "--nproc-per-node", "2", "bam_seed_tiny_cpu", "--run.out_dir=seed", "--run.steps=2", cwd=work)
    _cli_here(work, "export", "seed", "--out", "seed/export")  # the seed's tokenizer travels with it
    tok = "--data.tokenizer=seed/export/tokenizer.model"
    base = ["train", "bam_seed_tiny_cpu", "--parallel.cp=1", "--checkpoint.init_from=seed", tok]
    _cli_here(work, *base, "--run.out_dir=a0", "--run.steps=0")  # init_from alone: the seed's weights exactly
    seed_w, a0_w = (read_state_dict(resolve_source(work / d)) for d in ("seed", "a0"))
    assert seed_w.keys() == a0_w.keys() and all(torch.equal(seed_w[k], a0_w[k]) for k in seed_w)
    _cli_here(work, *base, "--run.out_dir=a", "--run.steps=1", "--data.passkey_fraction=0.6")
    _cli_here(work, *base, "--run.out_dir=b", "--run.steps=1", "--data.recall_fraction=0.6")
    a_w = read_state_dict(resolve_source(work / "a"))
    assert not torch.equal(a_w["embed_tokens.weight"], seed_w["embed_tokens.weight"])  # it trained on

    _cli_here(work, "upcycle", "--seeds", "a", "b/checkpoints/step-00000001", "--out", "bam", "--share-kv",
              "--top-k", "1")
    _cli_here(work, "train", "bam_tiny_cpu", "--parallel.cp=1", "--checkpoint.init_from=bam", tok,
              "--run.out_dir=mix", "--run.steps=1")
    np.save(work / "val2.npy", np.random.default_rng(0).integers(3, 500, 400))
    ev = ["--tokens", "val2.npy", "--ppl-lengths", "128", "--stride", "128", "--out"]
    dense = _cli_here(work, "eval", "seed", *ev, "eval_dense")
    mixed = _cli_here(work, "eval", "mix", *ev, "eval_mix")
    assert dense.startswith("loaded run folder seed") and mixed.startswith("loaded run folder mix")
    print("\njourney 2 ppl@128 dense / BAM:", _results(work, "eval_dense")["perplexity"][0]["ppl"],
          _results(work, "eval_mix")["perplexity"][0]["ppl"])

    # N identical seeds through the CLI: the mixture computes what the seed computes
    _cli_here(work, "upcycle", "--seeds", "seed", "seed", "--out", "same")
    _cli_here(work, "eval", "same", *ev, "eval_same")
    p_seed, p_same = (_results(work, d)["perplexity"][0]["ppl"] for d in ("eval_dense", "eval_same"))
    assert math.isclose(p_seed, p_same, rel_tol=1e-5), (p_seed, p_same)
    g = [_json_line(_cli_here(work, "generate", d, "--prompt", "The pass key is", "--max-new-tokens", "5", "--json"))
         for d in ("seed", "same")]
    assert g[0]["ids"] == g[1]["ids"]


@pytest.mark.slow
def test_journey_3_linear_attention(work):
    _sh("launch", "--nproc-per-node", "2", "tnl_tiny_cpu", "--run.out_dir=tnl", "--run.steps=2",
        "--run.save_every=0", "--train.seq_len=256", "--model.max_seq_len=256", cwd=work)
    out = _cli_here(work, "eval", "tnl", "--passkey-lengths", "256", "--depths", "0.5", "--seeds", "1",
                    "--out", "eval_tnl")
    assert out.startswith("loaded run folder tnl") and _results(work, "eval_tnl")["passkey"]["lengths"] == [256]
    gen = {d: _json_line(_cli_here(work, "generate", "tnl", "--prompt", "The pass key is 31. Remember it.",
                                   "--max-new-tokens", "8", "--decode", d, "--json")) for d in ("recurrent", "full")}
    assert gen["recurrent"]["decode"] == "recurrent" and gen["recurrent"]["ids"] == gen["full"]["ids"]


@pytest.mark.slow
def test_journey_4_mixtures(work):
    from safetensors.torch import load_file

    _sh("launch", "--nproc-per-node", "2", "moe_tiny_cpu", "--run.out_dir=moe", "--run.steps=1", cwd=work)
    _cli_here(work, "export", "moe", "--out", "moe/export")
    weights = load_file(str(work / "moe/export/model.safetensors"))
    experts = [k for k in weights if ".experts." in k]
    assert experts and all(weights[k].shape[0] == 4 for k in experts)  # both ranks' experts in one file
    _cli_here(work, "train", "moh_tiny_cpu", "--parallel.cp=1", "--run.out_dir=moh", "--run.steps=1")
    _cli_here(work, "export", "moh", "--out", "moh/export")
    np.save(work / "val4.npy", np.random.default_rng(0).integers(3, 500, 300))
    ppl = {}
    for src in ("moe", "moe/export", "moh", "moh/export"):
        out = src.replace("/", "_") + "_eval"
        _cli_here(work, "eval", src, "--tokens", "val4.npy", "--ppl-lengths", "128", "--stride", "128", "--out", out)
        ppl[src] = _results(work, out)["perplexity"][0]["ppl"]
    assert math.isclose(ppl["moe"], ppl["moe/export"], rel_tol=1e-6)
    assert math.isclose(ppl["moh"], ppl["moh/export"], rel_tol=1e-6)
