"""Engines (and DeepSpeed-Ulysses attention): the same tiny 2-rank run gives the same losses on DDP, DDP + activation offload, FSDP2
(two reshard settings), accelerate and DeepSpeed ZeRO 1/2/3 — and equals a single-process run of the
same global batches. Config checks and the generated DeepSpeed config."""
from __future__ import annotations

import json

import pytest
import torch

from longreach.engines import EngineConfig, EngineOptions, as_engine_config, build_engine
from longreach.errors import ConfigError
from longreach.testing import run_ranks
from workers import engines as w


def test_all_engines_same_loss_as_single_process():
    names = list(w.SPECS)
    res = run_ranks(w.engines_and_ulysses_worker, 2, args=(names, 4), timeout=600)
    ref = torch.tensor(w.single_process_reference(steps=4, world=2))
    failures = []

    def close(tag: str, got: torch.Tensor, want: torch.Tensor, **tol: float) -> None:
        try:
            torch.testing.assert_close(got, want, msg=lambda m: f"{tag}: {m}", **tol)
        except AssertionError as e:
            failures.append(str(e))

    for name in names:
        got = [r[name] for r in res]
        errors = [g for g in got if isinstance(g, str)]
        if errors:
            failures.append(f"{name}: {errors[0][-1500:]}")
            continue
        close(f"{name}: rank 1 vs rank 0 losses", torch.tensor(got[1]), torch.tensor(got[0]), rtol=0, atol=0)
        close(f"{name}: losses vs single process", torch.tensor(got[0]), ref, rtol=1e-5, atol=1e-6)
    # DeepSpeed-Ulysses as the alternative cp strategy: each rank's output and q/k/v grads vs full attention
    want = w.ulysses_reference()
    per = w.ULYSSES_SHAPE[1] // len(res)
    for rank, r in enumerate(res):
        if isinstance(r["ulysses"], str):
            failures.append(f"deepspeed ulysses rank {rank}: {r['ulysses'][-1500:]}")
            continue
        for key, full in want.items():
            close(f"deepspeed ulysses rank {rank} {key}", r["ulysses"][key], full[:, rank * per:(rank + 1) * per],
                  rtol=0, atol=1e-10)
    assert not failures, "\n".join(failures)
    # the run is not trivially constant: losses change across steps
    assert len({round(x, 6) for x in ref.tolist()}) == len(ref)


def test_single_process_native_and_activation_offload_match():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    grads = []
    for offload in (False, True):
        model = w.make_model()
        eng = build_engine(EngineConfig(options=EngineOptions(activation_offload=offload)), model, lambda ps: torch.optim.SGD(ps, lr=0.1))
        with eng.forward_context():
            loss = eng.model(x).pow(2).mean()
        eng.backward(loss)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_bf16_autocast_is_applied():
    model = w.make_model()
    eng = build_engine(as_engine_config("native").with_precision("bf16"), model, lambda ps: torch.optim.SGD(ps, lr=0.1))
    with eng.forward_context():
        out = eng.model(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,msg", [
    ({"kind": "megatron"}, "engine.kind"),
    ({"kind": "native", "zero_stage": 2}, "needs engine.kind=deepspeed"),
    ({"kind": "deepspeed", "zero_stage": 4}, r"engine\.options\.zero_stage"),
    ({"kind": "accelerate", "fsdp": True}, r"engine\.options\.fsdp=true needs engine\.kind=native"),
    ({"kind": "native", "cpu_offload": True}, r"needs engine\.options\.fsdp=true"),
    ({"kind": "native", "mixed_precision": "bf16"}, r"engine\.options\.mixed_precision was removed; use train\.precision"),
])
def test_engine_config_errors(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        as_engine_config(kwargs)


def test_as_engine_config_from_job_section():
    cfg = as_engine_config({"kind": "deepspeed", "options": {"zero_stage": 3}}).with_precision("bf16")
    assert cfg.kind == "deepspeed" and cfg.zero_stage == 3 and cfg.precision == "bf16"
    assert cfg == EngineConfig(kind="deepspeed", options=EngineOptions(zero_stage=3))
    with pytest.raises(ConfigError, match="loss scaler"):
        as_engine_config("native").with_precision("fp16")
    with pytest.raises(ConfigError, match=r"train\.precision must be one of"):
        as_engine_config("native").with_precision("fp8")
    with pytest.raises(ConfigError, match="did you mean 'zero_stage'"):
        as_engine_config({"kind": "deepspeed", "options": {"zero_stag": 2}})


def test_generated_deepspeed_config(tmp_path):
    from longreach.engines.deepspeed import deepspeed_config

    cfg = as_engine_config({"kind": "deepspeed", "zero_stage": 3, "cpu_offload": True}).with_precision("bf16")
    conf = deepspeed_config(cfg, world_size=4, grad_accum=2, micro_batch_size=3, grad_clip=1.0)
    assert conf["train_batch_size"] == 24 and conf["gradient_accumulation_steps"] == 2
    assert conf["zero_optimization"]["stage"] == 3
    assert conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert conf["bf16"] == {"enabled": True} and conf["gradient_clipping"] == 1.0
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    cfg2 = as_engine_config({"kind": "deepspeed", "zero_stage": 2, "deepspeed_config": str(user)})
    conf2 = deepspeed_config(cfg2, world_size=2)
    assert conf2["zero_optimization"] == {**deepspeed_config(as_engine_config({"kind": "deepspeed", "zero_stage": 2}),
                                                             world_size=2)["zero_optimization"],
                                          "reduce_bucket_size": 1000}
    user.write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(cfg2, world_size=2)


@pytest.mark.gpu
def test_fsdp2_cpu_offload_on_gpu():
    """FSDP2 CPUOffloadPolicy needs an accelerator: single-rank FSDP2 with offload matches plain training."""
    import torch.distributed as dist

    if not dist.is_initialized():  # a one-rank group from an in-memory store: no port at all
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        x = torch.randn(4, 8, device="cuda")
        ref = w.make_model().cuda()
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        model = w.make_model().cuda()
        eng = build_engine(as_engine_config({"fsdp": True, "cpu_offload": True}), model,
                           lambda ps: torch.optim.AdamW(ps, lr=1e-2))
        for _ in range(2):
            ref_loss = ref(x).pow(2).mean()
            ref_loss.backward()
            opt.step()
            opt.zero_grad()
            loss = eng.model(x).pow(2).mean()
            eng.backward(loss)
            eng.step()
            assert torch.allclose(loss.detach().cpu(), ref_loss.detach().cpu(), rtol=1e-5)
        assert next(model.parameters()).to_local().device.type == "cpu"
    finally:
        dist.destroy_process_group()


def test_engine_option_typo_is_rejected_when_the_config_loads(tmp_path):
    """engine.options is typed: the strict loader names a misspelt option (file and key) before any work,
    and the recipes' engine sections load into the same typed options."""
    from longreach.configio import load_config
    from longreach.job import JobConfig

    bad = tmp_path / "job.yaml"
    bad.write_text("engine:\n  kind: deepspeed\n  options:\n    zero_stag: 2\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: unknown config key 'engine\.options\.zero_stag'; "
                                          r"did you mean 'engine\.options\.zero_stage'"):
        load_config(JobConfig, str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("engine:\n  kind: deepspeed\n")
    with pytest.raises(ConfigError, match=r"engine\.options\.mixed_precision'? was removed; use train\.precision"):
        load_config(JobConfig, str(good), ["--engine.options={mixed_precision: bf16}"])
    cfg = load_config(JobConfig, str(good), ["--engine.options={zero_stage: 2}", "--train.precision=bf16"])
    assert cfg.engine == EngineConfig(kind="deepspeed", options=EngineOptions(zero_stage=2))
    assert cfg.engine.splits_experts()  # fp32 compute: ZeRO-2 keeps the experts split
    bf16 = cfg.engine.with_precision(cfg.train.precision)
    assert (bf16.zero_stage, bf16.splits_experts()) == (2, True)  # bf16: fp32 expert masters beside ZeRO-2
    recipe = load_config(JobConfig, "tnl_7b")
    assert recipe.engine.kind == "native" and recipe.engine.fsdp and recipe.engine.splits_experts()


def test_split_experts_follow_engine_options_not_the_deepspeed_file(tmp_path):
    """With split experts the engine handles them for engine.options.zero_stage and train.precision: a
    DeepSpeed JSON that changes either is a ConfigError naming both settings; ZeRO-0 with fp16 cannot split."""
    from longreach.engines.deepspeed import deepspeed_config
    from longreach.engines.deepspeed_experts import check_user_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = as_engine_config({"kind": "deepspeed", "zero_stage": 1, "deepspeed_config": str(user)})
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=3 but engine\.options\.zero_stage=1"):
        check_user_config(cfg, deepspeed_config(cfg, world_size=2))
    user.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"bf16\.enabled against train\.precision=fp32"):
        check_user_config(cfg, deepspeed_config(cfg, world_size=2))
    plain = as_engine_config({"kind": "deepspeed", "zero_stage": 3}).with_precision("bf16")
    check_user_config(plain, deepspeed_config(plain, world_size=2))  # consistent: no error
    fp16 = as_engine_config({"kind": "deepspeed", "zero_stage": 0}).with_precision("fp16")
    assert not fp16.splits_experts() and "zero_stage=0" in fp16.expert_split_problem()


def test_experts_that_cannot_split_fail_when_the_config_loads():
    """A job whose engine cannot split experts (DeepSpeed ZeRO-0 with fp16) while model.moe.expert_parallel is
    set under cp > 1 is refused when the config loads, naming the settings (before any run folder exists);
    the same engine without cp, or with bf16, loads."""
    from longreach.configio import load_config
    from longreach.job import JobConfig

    ds0 = ["--engine.kind=deepspeed", "--engine.options={zero_stage: 0}"]
    with pytest.raises(ConfigError, match=r"model\.moe\.expert_parallel cannot split the experts under "
                                          r"engine\.kind=deepspeed: train\.precision=fp16 with engine\.options\.zero_stage=0"):
        load_config(JobConfig, "moe_tiny_cpu", [*ds0, "--train.precision=fp16"])
    assert load_config(JobConfig, "moe_tiny_cpu", [*ds0, "--train.precision=bf16"]).parallel.cp == 2
    assert load_config(JobConfig, "moe_tiny_cpu", [*ds0, "--train.precision=fp16", "--parallel.cp=1"]).parallel.cp == 1
