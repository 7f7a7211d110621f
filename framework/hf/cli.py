"""``longreach finetune CONFIG [--section.field=value …]``: extend an HF checkpoint's context.

Loads the checkpoint, applies the recipe (RoPE scaling written into the config, LoRA via peft, our
attention through transformers' registry), trains at ``recipe.target_len`` on ``dp × cp`` ranks
(context-parallel groups of ``cp`` consecutive ranks; labels shifted globally before sharding; our
chunked loss normalised by the global token count; gradients summed over all ranks), then merges
LoRA and exports a plain HF checkpoint with the tokenizer files.

Engines: ``native`` runs this loop on plain torch.distributed (gradients all-reduced over dp × cp).
``deepspeed`` (ZeRO-2, bf16 — the cluster recipes) hands model and optimizer to
``deepspeed.initialize`` with the same loss and batches.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from longreach.errors import ConfigError, UserError
from longreach.hf.recipes import RecipeConfig

ENGINES = ("native", "deepspeed")


@dataclass(kw_only=True, slots=True)
class FTData:
    """Fine-tuning documents, tokenized with the checkpoint's tokenizer and cut into target_len sequences."""

    source: str = "synthetic"
    """``embedded``, ``synthetic`` or ``files`` (longreach's corpus sources), or ``tokens`` (``tokens_path``)."""
    paths: list[str] = field(default_factory=list)
    """For ``files``: text / jsonl files or folders."""
    tokens_path: str | None = None
    """For ``tokens``: a ``.npy`` of token ids or a token-shard folder."""
    synthetic_documents: int = 200
    """Documents of the ``synthetic`` source."""
    passkey_fraction: float = 0.3
    """Share of passkey-retrieval documents in generated sources."""
    task_chars: int = 3000
    """Longest generated task document, in characters."""
    seed: int = 0
    """Seed of generated documents and of the sequence order."""

    def __post_init__(self) -> None:
        if self.source not in ("embedded", "synthetic", "files", "tokens"):
            raise ConfigError(f"data.source={self.source!r} is not one of embedded, synthetic, files, tokens")
        if self.source == "tokens" and not self.tokens_path:
            raise ConfigError("data.source is 'tokens' but data.tokens_path is not set")
        if self.source == "files" and not self.paths:
            raise ConfigError("data.source is 'files' but data.paths is empty")


@dataclass(kw_only=True, slots=True)
class FTTrain:
    """Optimisation (LongLoRA: lr 2e-5, wd 0, 20 warmup steps, constant schedule, 1000 steps)."""

    steps: int = 1000
    """Optimizer steps."""
    lr: float = 2e-5
    """Peak learning rate."""
    warmup_steps: int = 20
    """Linear warmup, then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    micro_batch_size: int = 1
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    dtype: str = "auto"
    """Weights: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32`` or ``bfloat16``."""
    loss_chunk_size: int = 1024
    """Tokens per logits chunk of the loss."""
    log_every: int = 10
    """Steps between log lines."""
    seed: int = 0
    """Seed of LoRA initialisation."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "loss_chunk_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.lr must be > 0 and warmup_steps, weight_decay, grad_clip >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"train.dtype={self.dtype!r} is not auto, float32 or bfloat16")


@dataclass(kw_only=True, slots=True)
class FTParallel:
    """Degrees: world size = dp × cp (strategy and layout live in ``recipe.attention``)."""

    dp: int = 1
    """Data-parallel degree."""
    cp: int = 1
    """Context-parallel degree (consecutive ranks form one context-parallel group)."""

    def __post_init__(self) -> None:
        if self.dp < 1 or self.cp < 1:
            raise ConfigError(f"parallel.dp and parallel.cp must be >= 1 (got {self.dp}, {self.cp})")


@dataclass(kw_only=True, slots=True)
class FTEngine:
    """Training engine."""

    kind: str = "native"
    """``native`` (torch.distributed all-reduce) or ``deepspeed``."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage."""

    def __post_init__(self) -> None:
        if self.kind not in ENGINES:
            raise ConfigError(f"engine.kind={self.kind!r} is not one of {', '.join(ENGINES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"engine.zero_stage must be 0-3 (got {self.zero_stage})")


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    """A long-context fine-tuning job of an HF checkpoint."""

    checkpoint: str = ""
    """Local HF checkpoint folder to extend."""
    out_dir: str = "runs/finetune"
    """Run folder: resolved config, metrics, and the exported checkpoint under ``export/``."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the checkpoint."""
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    """LongLoRA / SinkLoRA / full, RoPE scaling, attention."""
    data: FTData = field(default_factory=FTData)
    """Fine-tuning data."""
    train: FTTrain = field(default_factory=FTTrain)
    """Optimisation."""
    parallel: FTParallel = field(default_factory=FTParallel)
    """dp × cp degrees."""
    engine: FTEngine = field(default_factory=FTEngine)
    """Training engine."""

    def __post_init__(self) -> None:
        if self.parallel.cp > 1 and self.recipe.attention.strategy == "none":
            raise ConfigError("parallel.cp > 1 needs recipe.attention.strategy (ring, ulysses, hybrid or allgather)")
        if self.parallel.cp == 1 and self.recipe.attention.strategy != "none":
            raise ConfigError(f"recipe.attention.strategy={self.recipe.attention.strategy!r} needs parallel.cp > 1")
        from longreach.parallel import layout_multiple

        m = layout_multiple(self.recipe.attention.layout, self.parallel.cp)
        if self.recipe.target_len % m:
            raise ConfigError(f"recipe.target_len={self.recipe.target_len} must divide by {m} "
                              f"(layout {self.recipe.attention.layout!r} on cp={self.parallel.cp})")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def tokenize_corpus(data: FTData, tokenizer: Any) -> np.ndarray:
    """All fine-tuning tokens, documents joined with the tokenizer's eos (``[N]`` int64)."""
    if data.source == "tokens":
        from longreach.evaluation.perplexity import load_tokens

        return np.asarray(load_tokens(data.tokens_path, tokenizer), dtype=np.int64)
    from longreach.data.config import DataConfig
    from longreach.data.corpus import corpus_documents
    from longreach.evaluation.common import TextCodec

    dcfg = DataConfig(source=data.source, paths=list(data.paths), synthetic_documents=data.synthetic_documents,
                      passkey_fraction=data.passkey_fraction, recall_fraction=0.0, task_chars=data.task_chars,
                      seed=data.seed, tokenizer=None, vocab_size=1024)
    codec = TextCodec(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None) if codec.hf else tokenizer.eos_id
    out: list[int] = []
    for doc in corpus_documents(dcfg):
        out += codec.encode(doc)
        if eos is not None:
            out.append(int(eos))
    return np.asarray(out, dtype=np.int64)


def sequence_stream(tokens: np.ndarray, seq_len: int, *, batch: int, dp_rank: int, dp_size: int, seed: int
                    ) -> Iterator[torch.Tensor]:
    """Endless ``[batch, seq_len]`` batches of disjoint windows, reshuffled each epoch, split over dp."""
    n = len(tokens) // seq_len
    if n < batch * dp_size:
        raise UserError(f"the fine-tuning data has {len(tokens)} tokens: fewer than {batch * dp_size} sequences of "
                        f"{seq_len} (micro_batch_size × dp); add data or shorten recipe.target_len")
    windows = torch.as_tensor(tokens[:n * seq_len]).view(n, seq_len)
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        per = n // dp_size
        mine = order[dp_rank * per:(dp_rank + 1) * per]
        for i in range(0, len(mine) - batch + 1, batch):
            yield windows[torch.as_tensor(mine[i:i + batch])]
        epoch += 1


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def make_groups(dp: int, cp: int) -> tuple[dist.ProcessGroup | None, int, int]:
    """(this rank's context-parallel group, dp rank, cp rank); every rank builds every group."""
    if not dist.is_initialized():
        if dp * cp != 1:
            raise ConfigError(f"parallel.dp × parallel.cp = {dp * cp} but no process group was launched")
        return None, 0, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    if dp * cp != world:
        raise ConfigError(f"parallel.dp * parallel.cp != WORLD_SIZE ({dp} * {cp} != {world})")
    mine = None
    for d in range(dp):
        ranks = list(range(d * cp, (d + 1) * cp))
        g = dist.new_group(ranks) if cp > 1 else None
        if rank in ranks:
            mine = g
    return mine, rank // cp, rank % cp


def finetune(cfg: FinetuneConfig, *, probe_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Run the job; returns a summary (losses, export folder). Every rank calls it.

    Args:
        cfg: the job.
        probe_ids: ``[1, S]`` tokens whose logits the fine-tuned, still patched model computes in eval
            mode (full causal attention, sharded as in training) before export — ``summary["probe_logits"]``
            ``[1, S, V]``, for checking the exported checkpoint against it.
    """
    from longreach.config import save_resolved
    from longreach.hf.export import export_hf
    from longreach.hf.load import load_hf
    from longreach.hf.patch import causal_lm_loss, sharded_batch
    from longreach.hf.recipes import apply_recipe, trainable_summary
    from longreach.trainer import setup_distributed

    if not cfg.checkpoint:
        raise ConfigError("checkpoint: set the HF checkpoint folder to fine-tune")
    rank, world, device, owned = setup_distributed()
    cp_group, dp_rank, _ = make_groups(cfg.parallel.dp, cfg.parallel.cp)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / "config.yaml")
    dtype = None if cfg.train.dtype == "auto" else getattr(torch, cfg.train.dtype)
    model, tokenizer = load_hf(cfg.checkpoint, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    if tokenizer is None and cfg.data.source != "tokens":
        raise UserError(f"{cfg.checkpoint}: no tokenizer files; use data.source: tokens")
    torch.manual_seed(cfg.train.seed)
    model, attention = apply_recipe(model, cfg.recipe, group=cp_group)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warm = cfg.train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    engine = None
    if cfg.engine.kind == "deepspeed":
        engine = _deepspeed(model, optimizer, scheduler, cfg)
    tokens = tokenize_corpus(cfg.data, tokenizer)
    stream = sequence_stream(tokens, cfg.recipe.target_len, batch=cfg.train.micro_batch_size, dp_rank=dp_rank,
                             dp_size=cfg.parallel.dp, seed=cfg.data.seed)
    losses: list[float] = []
    t0 = time.time()
    for step in range(cfg.train.steps):
        attention.step = step
        total = torch.zeros((), dtype=torch.float64)
        for _ in range(cfg.train.grad_accum):
            ids = next(stream).to(device)  # [mb, target_len]
            loss, _ = causal_lm_loss(model, sharded_batch(ids, fn=attention), group=None,
                                     chunk_size=cfg.train.loss_chunk_size)
            if engine is not None:
                # DeepSpeed divides by grad_accum and averages over ranks; our loss is already each
                # rank's share of the global mean (a sum over ranks), so undo the average.
                engine.backward(loss * world)
                engine.step()
            else:
                (loss / cfg.train.grad_accum).backward()
            total += loss.detach().double() / cfg.train.grad_accum
        if engine is None:
            _allreduce_grads(params)
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        if dist.is_initialized():
            dist.all_reduce(total)
        losses.append(float(total))
        if rank == 0 and (step % cfg.train.log_every == 0 or step == cfg.train.steps - 1):
            print(f"step {step} loss {losses[-1]:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                  f"({time.time() - t0:.1f}s)", flush=True)
    summary: dict[str, Any] = {"losses": losses, "trainable": trainable_summary(model),
                               "rope_parameters": getattr(model.config, "rope_parameters", None)}
    model.eval()
    if probe_ids is not None:
        summary["probe_logits"] = probe_logits(model, attention, probe_ids.to(device))
    if rank == 0:
        src = cfg.checkpoint
        export_hf(model, out / "export", tokenizer_dir=src)
        summary["export"] = str(out / "export")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if dist.is_initialized():
        dist.barrier()
    if owned:
        dist.destroy_process_group()
    return summary


@torch.no_grad()
def probe_logits(model: torch.nn.Module, attention: Any, ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits ``[B, S, V]`` of a patched model, gathered from the context-parallel shards."""
    from longreach.hf.patch import base_model, sharded_batch

    hf = base_model(model)
    batch = sharded_batch(ids, fn=attention)
    hidden = hf.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    logits = hf.get_output_embeddings()(hidden)  # [B, S_local, V]
    if attention.config.parallel:
        from longreach.parallel import unshard_sequence

        logits = unshard_sequence(logits.contiguous(), layout=attention.config.layout, group=attention.group, dim=1)
    return logits.cpu()


def _allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over every rank (dp × cp): each rank's loss is already its share of the global mean."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(g).to(p.dtype)
        off += n


def _deepspeed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: FinetuneConfig) -> Any:
    """DeepSpeed engine (ZeRO stage, bf16 on GPU) around the model; gradients reduced by DeepSpeed."""
    import deepspeed

    ds_cfg = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": torch.cuda.is_available() and cfg.train.dtype != "float32"},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine


def finetune_main(argv: list[str] | None = None) -> int:
    """``longreach finetune CONFIG [--section.field=value …]``."""
    p = argparse.ArgumentParser(prog="longreach finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML recipe (a file or a packaged name such as longlora_tiny_cpu)")
    p.add_argument("overrides", nargs="*", help="--section.field=value overrides")
    args, extra = p.parse_known_args(argv)
    try:
        from longreach.config import load_config

        cfg = load_config(FinetuneConfig, args.config, list(args.overrides) + extra)
        finetune(cfg)
    except UserError as e:
        print(f"longreach: error: {e}", file=sys.stderr)
        return 2
    return 0


main = finetune_main
