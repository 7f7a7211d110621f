"""Strict YAML configs: unknown keys with suggestions, coercion, overrides, errors with file and line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from longreach.configio import (apply_overrides, config_hash, load_config, resolve_config_path, save_resolved,
                                to_dict)
from longreach.errors import ConfigError, UserError


@dataclass(kw_only=True, slots=True)
class Optim:
    lr: float = 1e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Betas."""
    warmup: int = 10
    """Warm-up steps."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass(kw_only=True, slots=True)
class Model:
    dim: int = 64
    """Width."""
    kv_heads: int | None = None
    """KV heads."""
    tied: bool = False
    """Tie embeddings."""
    norm: Literal["rms", "layer"] = "rms"
    """Norm kind."""
    name: str = "tiny"
    """Name."""
    layers: list[int] = field(default_factory=lambda: [1, 2])
    """Layer ids."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form options."""
    path: Path | None = None
    """A path."""


@dataclass(kw_only=True, slots=True)
class Job:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    scheduler: str = field(default="cosine", metadata={"choices": ("cosine", "constant")})


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_and_coerce(tmp_path: Path) -> None:
    p = _write(tmp_path, "model:\n  dim: 128\n  kv_heads: 2\n  tied: yes\n  layers: [3, '4']\n  path: /x/y\n"
                         "  extra: {a: 1}\noptim:\n  lr: 2e-5\n  betas: [0.8, 0.99]\n  warmup: 1_00\n")
    # PyYAML 1.1 reads 2e-5 (no dot) as a string; the loader must coerce it by the field's type.
    assert isinstance(yaml.safe_load("x: 2e-5")["x"], str)
    cfg = load_config(Job, p)
    assert cfg.optim.lr == 2e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.99) and isinstance(cfg.optim.betas, tuple)
    assert cfg.optim.warmup == 100 and isinstance(cfg.optim.warmup, int)
    assert cfg.model.dim == 128 and cfg.model.kv_heads == 2 and cfg.model.tied is True
    assert cfg.model.layers == [3, 4]
    assert cfg.model.path == Path("/x/y")
    assert cfg.model.extra == {"a": 1}
    assert cfg.scheduler == "cosine"


def test_defaults_and_empty_file(tmp_path: Path) -> None:
    assert load_config(Job, None) == Job()
    assert load_config(Job, _write(tmp_path, "")) == Job()


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    p = _write(tmp_path, "model:\n  dim: 8\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Job, p)
    msg = str(e.value)
    assert str(p) in msg and "'optim.lrr'" in msg and "'optim.lr'" in msg
    with pytest.raises(ConfigError, match=r"'modle'.*'model'"):
        load_config(Job, _write(tmp_path, "modle:\n  dim: 8\n"))
    # nothing close: the valid keys are listed
    with pytest.raises(ConfigError, match="valid keys here: dim"):
        load_config(Job, _write(tmp_path, "model:\n  zzzzzz: 1\n"))


@pytest.mark.parametrize("text,key,expected", [
    ("model:\n  dim: abc\n", "model.dim", "int"),
    ("model:\n  tied: maybe\n", "model.tied", "bool"),
    ("model:\n  dim: 1.5\n", "model.dim", "int"),
    ("model:\n  layers: 3\n", "model.layers", "list"),
    ("optim:\n  betas: [0.9]\n", "optim.betas", "2 items"),
    ("model:\n  norm: batch\n", "model.norm", "one of"),
    ("scheduler: cosin\n", "scheduler", "cosine"),
    ("model: 3\n", "model", "mapping"),
])
def test_wrong_type_names_key_type_value(tmp_path: Path, text: str, key: str, expected: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(Job, p)
    msg = str(e.value)
    assert str(p) in msg and key in msg and expected in msg


def test_post_init_error_becomes_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml.*optim\.lr must be > 0"):
        load_config(Job, _write(tmp_path, "optim:\n  lr: -1\n"))


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "model:\n  dim: 8\n  tied: [1, 2\noptim:\n  lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Job, p)
    msg = str(e.value)
    assert "malformed YAML" in msg and f"{p}:" in msg and "\n" not in msg
    line = int(msg.split(f"{p}:")[1].split(":")[0])
    assert 3 <= line <= 5
    with pytest.raises(ConfigError, match=rf"{p.name}:3: .*duplicate key 'dim'"):
        load_config(Job, _write(tmp_path, "model:\n  dim: 8\n  dim: 9\n"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(Job, _write(tmp_path, "- a\n- b\n"))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(Job, missing)
    assert issubclass(ConfigError, UserError)


def test_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, "model:\n  dim: 8\n")
    cfg = load_config(Job, p, ["--optim.lr=2e-5", "--model.kv_heads=null", "--model.name=007", "--model.tied",
                               "true", "--model.layers=[5, 6]", "--model.extra.alpha=0.5", "scheduler=constant"])
    assert cfg.optim.lr == 2e-5
    assert cfg.model.kv_heads is None and cfg.model.dim == 8
    assert cfg.model.name == "007"  # a str field keeps the text as typed
    assert cfg.model.tied is True and cfg.model.layers == [5, 6]
    assert cfg.model.extra == {"alpha": 0.5}
    assert cfg.scheduler == "constant"
    with pytest.raises(ConfigError, match=r"'--optim.lrr=1'.*'optim.lr'"):
        load_config(Job, p, ["--optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.lr expects float, got 'fast'"):
        load_config(Job, p, ["--optim.lr=fast"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(Job, p, ["--optim.lr.x=1"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(Job, p, ["--optim.lr"])
    # an unknown key in the file is reported against the file even with overrides
    with pytest.raises(ConfigError, match=r"c\.yaml.*'model.dimm'"):
        load_config(Job, _write(tmp_path, "model:\n  dimm: 8\n"), ["--optim.lr=1"])


def test_apply_overrides_reruns_checks() -> None:
    cfg = Job()
    new = apply_overrides(cfg, ["--optim.warmup=3"])
    assert new.optim.warmup == 3 and cfg.optim.warmup == 10
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        apply_overrides(cfg, ["--optim.lr=0"])


def test_save_resolved_round_trip_and_hash(tmp_path: Path) -> None:
    cfg = load_config(Job, None, ["--optim.lr=3e-4", "--model.path=/a/b", "--model.extra.k=[1, 2]"])
    out = save_resolved(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Job, out)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(apply_overrides(cfg, ["--optim.warmup=11"])) != config_hash(cfg)
    assert to_dict(cfg)["model"]["path"] == "/a/b"
    assert list((tmp_path / "run").iterdir()) == [out]  # no temporary file left behind


def test_job_config_demo_recipe_loads() -> None:
    from longreach.job import JobConfig

    path = resolve_config_path("demo")
    assert path.name == "demo.yaml" and path.is_file()
    cfg = load_config(JobConfig, "demo", ["--train.lr=2e-2"])
    assert cfg.train.lr == 2e-2 and cfg.data.source == "embedded" and cfg.parallel.cp == 2
    with pytest.raises(ConfigError, match="did you mean 'train.seq_len'"):
        load_config(JobConfig, "demo", ["--train.seqlen=64"])
    with pytest.raises(ConfigError, match="packaged recipes: .*demo"):
        resolve_config_path("no-such-recipe")


@pytest.mark.parametrize("text,match", [
    ("optim:\n  warmup: 1e30\n", r"optim\.warmup expects int, got '1e30' \(a float"),
    ("optim:\n  warmup: 4.0\n", r"optim\.warmup expects int, got 4\.0 \(a float"),
    ("optim:\n  lr: .nan\n", r"optim\.lr expects a finite float, got nan"),
    ("optim:\n  lr: -.inf\n", r"optim\.lr expects a finite float, got -inf"),
    ("optim:\n  lr: inf\n", r"optim\.lr expects a finite float, got 'inf'"),
])
def test_integers_reject_floats_and_floats_are_finite(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(Job, _write(tmp_path, text))
    key, _, value = text.split("\n")[1].strip().partition(": ")
    with pytest.raises(ConfigError, match=match):
        load_config(Job, None, [f"--optim.{key}={value}"])


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """Nine levels of nine aliases expand to 9**9 values: refused from the node graph before construction."""
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    p = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: YAML expands to more than 100000 values through aliases"):
        load_config(Job, p)
    # small alias use stays allowed
    ok = _write(tmp_path, "optim: &o {lr: 0.5}\n", "ok.yaml")
    assert load_config(Job, ok).optim.lr == 0.5


def test_one_knob_per_concept_and_one_error_type(tmp_path: Path) -> None:
    """Removed duplicate knobs name the kept key (from a file and as an override); every config check raises
    ConfigError, which is both the CLI's UserError (exit 2) and a ValueError."""
    from longreach.job import JobConfig, TrainConfig
    from longreach.parallel.config import ParallelConfig

    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match=r"config key 'parallel.backend' was removed; use attention.backend"):
        load_config(JobConfig, "demo", ["--parallel.backend=cpu"])
    f = tmp_path / "job.yaml"
    f.write_text("parallel:\n  cp: 1\n  backend: cpu\n")
    with pytest.raises(ConfigError, match=rf"{f}: config key 'parallel.backend' was removed"):
        load_config(JobConfig, f)
    with pytest.raises(ConfigError, match=r"engine.options.mixed_precision.? was removed; use train.precision"):
        load_config(JobConfig, "demo", ["--engine.kind=deepspeed", "--engine.options={mixed_precision: bf16}"])
    with pytest.raises(ConfigError, match=r"train.precision=fp16 needs a loss scaler"):
        load_config(JobConfig, "demo", ["--train.precision=fp16"])
    assert load_config(JobConfig, "demo", ["--train.precision=fp16", "--engine.kind=deepspeed"]).train.precision == "fp16"
    with pytest.raises(ConfigError, match=r"train.seq_len=62 does not divide by 4"):
        load_config(JobConfig, "demo", ["--train.seq_len=62"])
    with pytest.raises(ConfigError, match=r"parallel.strategy=hybrid needs parallel.ulysses_degree dividing"):
        load_config(JobConfig, "demo", ["--parallel.strategy=hybrid"])
    with pytest.raises(ConfigError, match=r"parallel.strategy must be one of 'ring', 'ulysses', 'hybrid', 'allgather'"):
        load_config(JobConfig, "demo", ["--parallel.strategy=rings"])
    with pytest.raises(ConfigError, match=r"train.lr must be > 0"):
        TrainConfig(lr=-1.0)
    assert ParallelConfig(cp=2).dims(4).dp == 2
    with pytest.raises(ValueError, match=r"dp \* cp != WORLD_SIZE \(1 \* 2 != 4\)"):
        ParallelConfig(dp=1, cp=2).dims(4)
