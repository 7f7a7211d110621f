"""BAM upcycling: N dense parallel-block seeds → soft Mixture-of-Attention + MoE FFN."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import yaml

from longreach.configio import from_dict
from longreach.errors import UserError
from longreach.mixtures import upcycle_state_dicts
from longreach.mixtures.bam import MoAttention
from longreach.mixtures.upcycle import load_state, main as upcycle_main
from longreach.models import ModelConfig, build_model

torch.set_num_threads(1)

DENSE = dict(vocab_size=37, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=40, parallel_block=True)


def _dense_model(seed: int):
    torch.manual_seed(seed)
    cfg = ModelConfig(**DENSE)
    return build_model(cfg).double(), cfg


def _zero_routers(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.zero_()


def _mixture(states, cfg, **kw):
    mix_cfg, state = upcycle_state_dicts(states, cfg, **kw)
    model = build_model(mix_cfg).double()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("share_kv", [False, True])
def test_identical_seeds_with_zero_routers_reproduce_dense(share_kv):
    dense, cfg = _dense_model(0)
    ids = torch.randint(0, 37, (2, 9))
    want = dense(ids)
    sd = dense.state_dict()
    mix = _mixture([sd, sd, sd], cfg, share_kv=share_kv, top_k=2)
    assert isinstance(mix.layers[0].self_attn, MoAttention)
    _zero_routers(mix)
    torch.testing.assert_close(mix(ids), want, rtol=1e-12, atol=1e-12)
    # random routers still reproduce it (identical experts, gates summing to one)
    mix_rand = _mixture([sd, sd, sd], cfg, share_kv=share_kv, top_k=2)
    torch.testing.assert_close(mix_rand(ids), want, rtol=1e-10, atol=1e-12)


def test_shared_kv_equals_full_moa_with_tied_kv():
    seeds = [_dense_model(s)[0].state_dict() for s in (1, 2, 3)]
    cfg = ModelConfig(**DENSE)
    shared = _mixture(seeds, cfg, share_kv=True, top_k=2, seed=5)
    tied = [dict(sd) for sd in seeds]
    for i in range(cfg.n_layers):
        for kv in ("k_proj", "v_proj"):
            key = f"layers.{i}.self_attn.{kv}.weight"
            avg = torch.stack([sd[key] for sd in seeds]).mean(0)
            for sd in tied:
                sd[key] = avg
    full = _mixture(tied, cfg, share_kv=False, top_k=2, seed=5)
    ids = torch.randint(0, 37, (2, 10))
    y_shared, y_full = shared(ids), full(ids)
    torch.testing.assert_close(y_shared, y_full, rtol=1e-10, atol=1e-12)
    # averaged non-expert parameters, experts copied, routers random
    torch.testing.assert_close(shared.embed_tokens.weight, torch.stack([sd["embed_tokens.weight"] for sd in seeds]).mean(0))
    torch.testing.assert_close(shared.layers[1].mlp.experts.up_proj.weight[2], seeds[2]["layers.1.mlp.up_proj.weight"])
    assert shared.layers[0].self_attn.router.weight.abs().sum() > 0
    # gradients flow into every expert of the soft attention mixture
    y_shared.sum().backward()
    assert shared.layers[0].self_attn.o_proj.weight.grad.abs().sum(dim=(1, 2)).min() > 0


def test_upcycle_cli_round_trip_and_bad_input(tmp_path):
    from safetensors.torch import save_file

    paths = []
    for s in (0, 0):
        dense, cfg = _dense_model(s)
        d = tmp_path / f"seed{len(paths)}"
        d.mkdir()
        save_file(dense.float().state_dict(), str(d / "model.safetensors"))
        (d / "config.yaml").write_text(yaml.safe_dump({"model": asdict(cfg)}))
        paths.append(d)
    out = tmp_path / "bam"
    assert upcycle_main(["--seeds", *map(str, paths), "--out", str(out), "--share-kv", "--top-k", "1"]) == 0
    mix_cfg = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert mix_cfg["attention_type"] == "moa" and mix_cfg["ffn_type"] == "moe" and mix_cfg["parallel_block"]
    assert mix_cfg["moa"] == {"experts": 2, "share_kv": True} and mix_cfg["moe"]["experts"] == 2
    model = build_model(from_dict(ModelConfig, mix_cfg))
    model.load_state_dict(load_state(out / "model.safetensors"))
    _zero_routers(model)
    dense, _ = _dense_model(0)
    ids = torch.randint(0, 37, (1, 7))
    torch.testing.assert_close(model(ids), dense.float()(ids), rtol=1e-5, atol=1e-5)

    with pytest.raises(UserError, match="missing_seed"):
        upcycle_main(["--seeds", str(paths[0]), str(tmp_path / "missing_seed"), "--out", str(tmp_path / "x")])
    bad = tmp_path / "bad.pt"
    sd = load_state(paths[0] / "model.safetensors")
    sd["layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    torch.save(sd, bad)
    with pytest.raises(UserError, match="bad.pt"):
        upcycle_main(["--seeds", str(paths[0]), str(bad), "--out", str(tmp_path / "y"),
                      "--model-config", str(paths[0] / "config.yaml")])
    seq = tmp_path / "seq.yaml"
    seq.write_text(yaml.safe_dump({"model": {**DENSE, "parallel_block": False}}))
    with pytest.raises(UserError, match="parallel"):
        upcycle_main(["--seeds", str(paths[0]), "--out", str(tmp_path / "z"), "--model-config", str(seq)])
