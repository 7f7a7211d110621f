"""Dry run on the meta device: validate a cluster config for N ranks without any accelerator.

``longreach launch --dry-run --validate CONFIG --world-size N`` (a) checks the parallel degrees
against N, (b) starts torch's *fake* process group (``FakeStore`` + backend ``"fake"``: every
collective returns immediately) as rank 0 of N, (c) builds the ("dp", "cp") DeviceMesh, (d) builds the
model on the meta device (no memory) and applies the real ``longreach.model_setup.parallelize`` step
(which never wraps for data parallelism), then FSDP2 when the engine shards, and (e) estimates the memory
per rank. Nothing touches a GPU or the network.

DDP cannot wrap meta tensors (it verifies parameter shapes across ranks with real values), so for a
replicated engine the replication is estimated, not performed; FSDP2's ``fully_shard`` runs for real on
the meta parameters, so the printed shard sizes are what each rank would hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from longreach.errors import ConfigError, UserError
from longreach.planning.costmodel import MODELS, MemoryOptions, ModelShape, run_memory
from longreach.planning.hardware import get_profile

__all__ = ["DryRunReport", "validate_config", "estimate_memory", "model_shape"]

_GIB = 1024 ** 3


@dataclass(kw_only=True, slots=True)
class DryRunReport:
    world_size: int
    """Ranks validated for."""
    dp: int
    """Data-parallel degree."""
    cp: int
    """Context-parallel degree."""
    mesh: str
    """The DeviceMesh as built."""
    engine: str
    """Engine and sharding."""
    params: int
    """Model parameters (total)."""
    params_per_rank: int
    """Parameters held per rank (after sharding)."""
    tokens_per_rank: int
    """Tokens per rank per micro-batch (seq_len / cp × micro_batch_size)."""
    memory: dict[str, float] = field(default_factory=dict)
    """Estimated bytes per rank by kind (params, grads, optimizer, activations, logits)."""
    notes: list[str] = field(default_factory=list)
    """What was recorded rather than run, warnings."""
    hardware: str = "h100_sxm"
    """Device profile the memory is checked against (``longreach.planning.hardware.PROFILES``)."""
    capacity: float = 0.0
    """That device's memory, bytes."""
    host_capacity: float = 0.0
    """Host memory per device for offloaded state, bytes."""

    @property
    def fits(self) -> bool:
        """The estimated peak fits the device, and what it offloads fits the host."""
        return (self.memory.get("total", 0.0) <= self.capacity
                and self.memory.get("host", 0.0) <= self.host_capacity)

    def lines(self) -> list[str]:
        out = [f"world size {self.world_size}: dp {self.dp} × cp {self.cp}; mesh {self.mesh}",
               f"engine: {self.engine}",
               f"parameters: {self.params / 1e6:.2f}M total, {self.params_per_rank / 1e6:.2f}M per rank",
               f"tokens per rank per micro-batch: {self.tokens_per_rank}",
               f"memory estimate per rank (longreach plan's model; peak = (states + kept + per-model + largest "
               f"phase) × 1.05 + 1.5 GB):"]
        for k, v in self.memory.items():
            out.append(f"  {k:<16} {v / _GIB:10.3f} GiB")
        out.append(f"{self.hardware}: {self.memory.get('total', 0.0) / _GIB:.1f} GiB of {self.capacity / _GIB:.1f} GiB "
                   f"per device, {self.memory.get('host', 0.0) / _GIB:.1f} GiB of {self.host_capacity / _GIB:.1f} GiB "
                   f"host memory per device: {'fits' if self.fits else 'DOES NOT FIT'}")
        out += [f"note: {n}" for n in self.notes]
        return out


def model_shape(model_cfg: Any) -> Any:
    """The planner's :class:`~longreach.planning.costmodel.ModelShape` of a ``model:`` section."""
    return ModelShape(name=model_cfg.arch, layers=model_cfg.n_layers, hidden=model_cfg.dim, heads=model_cfg.n_heads,
                      kv_heads=model_cfg.n_kv_heads, head_dim=model_cfg.head_dim,
                      ffn=model_cfg.ffn_hidden or 4 * model_cfg.dim, vocab=model_cfg.vocab_size,
                      attention="linear" if model_cfg.arch == "transnormer" else "softmax",
                      tied_embeddings=model_cfg.tie_embeddings)


def estimate_memory(*, params: int, params_per_rank: int, cfg: Any, engine: Any, n_shards: int,
                    hardware: str = "h100_sxm") -> dict[str, float]:
    """Bytes per rank of a longreach job from the planner's one memory model
    (:func:`longreach.planning.costmodel.run_memory`, also behind ``longreach plan``).

    Fed with this config: the real parameter count, states at 16 B/param (weights, gradients, Adam)
    sharded as the engine shards (DDP: replicated; FSDP2 or ZeRO-3: over all ranks; ZeRO-1/2: optimizer /
    + gradients), optimizer state on the host with ``engine.cpu_offload``; activations of one micro-batch
    as measured by ``longreach bench memory`` (checkpointing, ``model.sequence_tile``,
    ``model.checkpoint_offload``); the strategy's communication buffers; one loss chunk of logits.
    ``host`` is what it offloads per rank.
    """
    m, tr, par = cfg.model, cfg.train, cfg.parallel
    dtype_bytes = 2 if (tr.precision in ("bf16", "fp16")) else 4
    zero = engine.zero_stage if engine.kind == "deepspeed" else (3 if engine.fsdp else 0)
    shards = n_shards if zero else 1
    if engine.fsdp and params_per_rank:
        shards = max(1, round(params / params_per_rank))
    opts = MemoryOptions(checkpointing=tr.activation_checkpointing, offload=m.checkpoint_offload,
                         tiled=m.sequence_tile > 0, tile_tokens=m.sequence_tile or 8192,
                         optimizer_offload=engine.cpu_offload, loss_chunk=tr.loss_chunk_size)
    return run_memory(model_shape(m), seq_len=tr.seq_len, micro_batch=tr.micro_batch_size, cp=par.cp,
                      strategy=par.strategy, layout=par.layout, ulysses_degree=par.ulysses_degree, opts=opts,
                      zero=zero, shards=shards, profile=get_profile(hardware), dtype_bytes=dtype_bytes,
                      params=float(params))


def validate_config(config: str, world_size: int, overrides: list[str] | tuple[str, ...] = (),
                    hardware: str = "h100_sxm") -> DryRunReport:
    """Validate ``config`` for ``world_size`` ranks on the meta device with a fake process group.

    The memory estimate is checked against ``hardware`` (:attr:`DryRunReport.fits`).

    Raises:
        UserError: a config error, or degrees that do not fit ``world_size``.
    """
    import torch.distributed as dist

    from longreach.configio import load_config
    from longreach.engines import as_engine_config
    from longreach.job import JobConfig

    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    try:
        profile = get_profile(hardware)
    except ValueError as e:
        raise UserError(f"--hardware: {e}") from None
    if _is_finetune_recipe(config):
        return _validate_finetune(config, world_size, list(overrides), profile)
    cfg = load_config(JobConfig, config, list(overrides))
    engine = as_engine_config(cfg.engine)
    par = cfg.parallel
    dp = _degrees(par, world_size).dp
    if par.strategy in ("ulysses", "hybrid"):
        u = par.cp if par.strategy == "ulysses" else par.ulysses_degree
        if cfg.model.n_heads % u:
            raise UserError(f"parallel.strategy={par.strategy} splits the {cfg.model.n_heads} heads (model.n_heads) "
                            f"over {u} ranks: they must divide evenly")
        # fewer K/V heads than ranks are replicated (DeepSpeed-style), so there is no check on them

    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise UserError("the dry run needs a fresh process (torch.distributed is already initialised)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    notes: list[str] = []
    try:
        from longreach.models import build_model
        from longreach.model_setup import parallelize
        from longreach.parallel.mesh import ParallelDims

        mesh = ParallelDims(dp=dp, cp=par.cp, world_size=world_size).build_mesh("cpu")
        with torch.device("meta"):
            model = build_model(cfg.model)
        params = sum(p.numel() for p in model.parameters())
        model = parallelize(model, cfg, mesh)  # seams, experts, checkpointing; the engine wraps for dp
        params_per_rank = params
        n_shards = world_size
        if engine.kind == "native" and engine.fsdp:
            from torch.distributed.fsdp import fully_shard

            inner = getattr(model, "module", model)
            names = mesh.mesh_dim_names or ()
            shard_mesh = mesh[tuple(names)]._flatten("dp_cp") if len(names) > 1 else mesh
            for block in getattr(inner, "layers", []):
                fully_shard(block, mesh=shard_mesh)
            fully_shard(inner, mesh=shard_mesh)
            params_per_rank = sum(p.to_local().numel() for p in inner.parameters())
            notes.append(f"FSDP2 fully_shard over {shard_mesh.size()} ranks applied on the meta device")
        elif engine.kind == "deepspeed":
            notes.append(f"DeepSpeed ZeRO-{engine.zero_stage} partitioning estimated over {world_size} ranks")
        elif world_size > 1:  # the engine's DDP needs real collectives: replication is estimated, not run
            notes.append(f"{'DDP' if engine.kind == 'native' else 'accelerate (DDP)'} over {world_size} ranks "
                         "estimated (not run on meta tensors)")
        mem = estimate_memory(params=params, params_per_rank=params_per_rank, cfg=cfg, engine=engine,
                              n_shards=n_shards, hardware=hardware)
        return DryRunReport(
            world_size=world_size, dp=dp, cp=par.cp, mesh=str(mesh),
            engine=engine.kind + (" (FSDP2)" if engine.fsdp else f" ZeRO-{engine.zero_stage}"
                                  if engine.kind == "deepspeed" else " (DDP)" if engine.kind == "native" else ""),
            params=params, params_per_rank=params_per_rank,
            tokens_per_rank=cfg.train.micro_batch_size * cfg.train.seq_len // par.cp, memory=mem, notes=notes,
            hardware=hardware, capacity=profile.memory_bytes, host_capacity=profile.host_memory_bytes)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ HF fine-tuning recipes
def _degrees(par: Any, world_size: int) -> Any:
    """The ``parallel:`` section's degrees on ``--world-size`` ranks, validated once (``ParallelDims``)."""
    try:
        return par.dims(world_size)
    except ValueError as e:
        raise ConfigError(f"--world-size {world_size}: {e}") from None


def _is_finetune_recipe(config: str) -> bool:
    import yaml

    try:
        with open(config) as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return False  # load_config reports it
    return isinstance(data, dict) and "hf" in data


def _hf_shape(path: str, notes: list[str]) -> Any:
    """The planner's shape of the HF model at ``path``: its ``config.json``, else the preset its name matches."""
    import json
    import os

    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as fh:
            c = json.load(fh)
        notes.append(f"model shape from {cfg_file}")
        return ModelShape(name=c.get("model_type", "hf"), layers=c["num_hidden_layers"], hidden=c["hidden_size"],
                          heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads"),
                          head_dim=c.get("head_dim"), ffn=c["intermediate_size"], vocab=c["vocab_size"],
                          tied_embeddings=bool(c.get("tie_word_embeddings", False)))
    key = os.path.basename(os.path.normpath(path)).lower().replace("-", "").replace("_", "").replace("meta", "")
    for name, shape in MODELS.items():
        if name.replace("_", "") in key.replace("hf", "").replace("chat", ""):
            notes.append(f"{cfg_file} not found here: shape of the {shape.name} preset (matched by name)")
            return shape
    raise UserError(f"hf.path={path}: no config.json there and the name matches no preset "
                    f"({', '.join(MODELS)}); the dry run needs the model's shape")


def _validate_finetune(config: str, world_size: int, overrides: list[str], profile: Any) -> DryRunReport:
    """An HF fine-tuning recipe: degrees checked, memory from the planner's model (frozen base + LoRA).

    The base weights are frozen bf16 copies (2 B/param, sharded only by ZeRO-3); the trainable part (LoRA
    adapters and the recipe's ``trainable`` embeddings/norms) carries 16 B/param sharded per the stage.
    Activations follow ``train.activation_checkpointing``, ``train.sequence_tile`` and
    ``train.checkpoint_offload`` (the fine-tune's names for ``model.sequence_tile`` / ``model.checkpoint_offload``).
    """
    from longreach.configio import load_config
    from longreach.engines import as_engine_config
    from longreach.hf.config import FinetuneConfig

    cfg = load_config(FinetuneConfig, config, overrides)
    engine = as_engine_config(cfg.engine)
    par, tr, rec = cfg.parallel, cfg.train, cfg.recipe
    dp = _degrees(par, world_size).dp
    notes: list[str] = [f"recipe {rec.method}: target length {rec.target_len}, attention pattern "
                        f"{cfg.attention.pattern}"]
    shape = _hf_shape(cfg.hf.path, notes)
    if par.strategy in ("ulysses", "hybrid"):
        u = par.cp if par.strategy == "ulysses" else (par.ulysses_degree or 1)
        if shape.heads % u:
            raise UserError(f"parallel.strategy={par.strategy} splits the {shape.heads} heads of {cfg.hf.path} "
                            f"over {u} ranks: they must divide evenly")
    zero = engine.zero_stage if engine.kind == "deepspeed" else (3 if engine.fsdp else 0)
    h, qd, kvd = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    dims = {"q_proj": h + qd, "k_proj": h + kvd, "v_proj": h + kvd, "o_proj": qd + h,
            "gate_proj": h + shape.ffn, "up_proj": h + shape.ffn, "down_proj": shape.ffn + h}
    lora = shape.layers * rec.lora_r * sum(dims.get(t, 2 * h) for t in rec.lora_targets)
    trainable = float(lora)
    if "embed" in rec.trainable:
        trainable += shape.vocab * h
    if "norm" in rec.trainable:
        trainable += (2 * shape.layers + 1) * h
    base = float(shape.params())
    shards = world_size if zero else 1
    tokens = tr.micro_batch_size * tr.seq_len // par.cp
    opts = MemoryOptions(checkpointing=tr.activation_checkpointing, offload=tr.checkpoint_offload,
                         tiled=tr.sequence_tile > 0, tile_tokens=tr.sequence_tile or 8192,
                         optimizer_offload=engine.cpu_offload, loss_chunk=tr.loss_chunk_size)
    # bf16 compute beside fp32 master embeddings (trainable, hf.pure_bf16 off) makes the residual stream fp32
    fp32_stream = not cfg.hf.pure_bf16 and (rec.method == "full" or any("embed" in t for t in rec.trainable))
    mem = run_memory(shape, seq_len=tr.seq_len, micro_batch=tr.micro_batch_size, cp=par.cp, strategy=par.strategy,
                     layout=par.layout, ulysses_degree=par.ulysses_degree, opts=opts, zero=zero, shards=shards,
                     profile=profile, params=trainable, frozen_params=base, stream_bytes=4 if fp32_stream else 2,
                     separate_final_norm=True)
    notes.append(f"activations: {opts.label} (train.activation_checkpointing={tr.activation_checkpointing}, "
                 f"train.sequence_tile={tr.sequence_tile}, train.checkpoint_offload={tr.checkpoint_offload}); "
                 f"hidden states kept in {'fp32 (fp32 trainable embeddings)' if fp32_stream else 'bf16'}"
                 + (f"; checkpointed block inputs in host memory: {mem['host'] / _GIB:.2f} GiB per rank"
                    if opts.checkpointing and opts.offload else ""))
    unset = [k for k, on in (("train.activation_checkpointing=true", opts.checkpointing),
                             ("train.sequence_tile=8192", opts.tiled), ("train.checkpoint_offload=true", opts.offload))
             if not on]
    if mem["total"] > profile.memory_bytes and unset:
        notes.append(f"this HF recipe's activations shrink with {', '.join(unset)}")
    notes.append(f"{trainable / 1e6:.1f}M trainable (LoRA r={rec.lora_r} on {', '.join(rec.lora_targets)} + "
                 f"{', '.join(rec.trainable) or 'nothing else'}) at 16 B/param; {base / 1e9:.2f}B frozen at 2 B/param")
    return DryRunReport(world_size=world_size, dp=dp, cp=par.cp, mesh=f"(dp={dp}, cp={par.cp}) (not built: HF recipe)",
                        engine=engine.kind + (f" ZeRO-{engine.zero_stage}" if engine.kind == "deepspeed" else ""),
                        params=int(base + lora), params_per_rank=int((base + lora) / (shards if zero >= 3 else 1)),
                        tokens_per_rank=tokens, memory=mem, notes=notes,
                        hardware=profile.name, capacity=profile.memory_bytes, host_capacity=profile.host_memory_bytes)
