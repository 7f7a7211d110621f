"""Rank workers for the HF-integration tests (spawned by ``longreach.testing.run_ranks``).

Each worker runs a whole matrix inside one process group and returns what the test asserts on.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def tiny_llama_config(**overrides: Any) -> Any:
    """A tiny HF ``LlamaConfig`` (GQA 4:2, 2 layers, context 16)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def cp_equivalence(rank: int, world_size: int, strategies: list[str], layouts: list[str], seq_len: int,
                   backend: str) -> list[str]:
    """Patched HF attention under context parallelism equals one rank: loss, logits and gradients.

    Returns:
        Failure descriptions (empty when everything matches).
    """
    from transformers import LlamaForCausalLM

    from longreach.hf.patch import (AttentionPatch, base_model, causal_lm_loss, patch_attention, sharded_batch,
                                    unpatch_attention)
    from longreach.parallel import unshard_sequence

    failures: list[str] = []
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).double()
    ids = torch.randint(0, 97, (2, seq_len), generator=torch.Generator().manual_seed(1))

    def run(cfg: AttentionPatch, pattern_training: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        fn = patch_attention(model, cfg)
        model.train(pattern_training)
        model.zero_grad(set_to_none=True)
        batch = sharded_batch(ids, fn=fn)
        loss, _ = causal_lm_loss(model, batch, chunk_size=7)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g)
        total = loss.detach().clone()
        dist.all_reduce(total)
        with torch.no_grad():
            hf = base_model(model)
            h = hf.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
            logits = hf.lm_head(h)
            if cfg.parallel:
                logits = unshard_sequence(logits.contiguous(), layout=cfg.layout, dim=1)
        unpatch_attention(model)
        return total, logits, grads

    for pattern in ("full", "s2", "sf"):
        ref_loss, ref_logits, ref_grads = run(AttentionPatch(pattern=pattern, backend="reference"), True)
        if pattern == "full":
            # the unpatched model (transformers' own attention) on the whole sequence: same loss
            model.set_attn_implementation("sdpa")
            with torch.no_grad():
                plain = model(ids).logits
            if not torch.allclose(plain, ref_logits, atol=1e-10, rtol=1e-9):
                failures.append(f"unpatched vs patched logits differ by {(plain - ref_logits).abs().max():.3e}")
        for strategy in strategies:
            for layout in layouts:
                cfg = AttentionPatch(pattern=pattern, strategy=strategy, layout=layout, backend=backend)
                loss, logits, grads = run(cfg, True)
                tag = f"{pattern}/{strategy}/{layout}"
                if not torch.allclose(loss, ref_loss, atol=1e-10, rtol=1e-9):
                    failures.append(f"{tag}: loss {loss.item()} vs {ref_loss.item()}")
                if not torch.allclose(logits, ref_logits, atol=1e-9, rtol=1e-8):
                    failures.append(f"{tag}: logits differ by {(logits - ref_logits).abs().max():.3e}")
                for name, g in grads.items():
                    if not torch.allclose(g, ref_grads[name], atol=1e-9, rtol=1e-7):
                        failures.append(f"{tag}: grad {name} differs by {(g - ref_grads[name]).abs().max():.3e}")
                        break
    return failures


def finetune_job(rank: int, world_size: int, checkpoint: str, out_dirs: dict[str, str], tokens_path: str,
                 target_len: int, steps: int, backend: str, resume_dir: str | None = None) -> dict[str, Any]:
    """Fine-tune a saved tiny Llama at ``target_len`` with each recipe under ring CP on all ranks.

    Every recipe run checkpoints at step ``steps // 2``. With ``resume_dir``, the first recipe is run
    again there, stopped at that step (a run of ``steps // 2`` steps) and continued by a second
    ``finetune`` call with the full step count, which resumes from the checkpoint.

    Returns:
        Per recipe: losses, rope_parameters and the probe ids/logits (eval-mode patched model); under
        ``"resumed"``: the losses of the interrupted-and-resumed run and the step each call ended at.
    """
    from longreach.hf.config import FinetuneConfig, FTAttention, FTData, FTRun, FTTrain, HFSource
    from longreach.hf.train import finetune
    from longreach.hf.recipes import RecipeConfig
    from longreach.hf.rope import RopeScaling
    from longreach.parallel.config import ParallelConfig

    probe = torch.randint(0, 97, (1, target_len), generator=torch.Generator().manual_seed(5))

    def job(name: str, out_dir: str, n_steps: int) -> FinetuneConfig:
        method, pattern = {"s2": ("longlora", "s2"), "sf": ("sinklora", "sf")}[name]
        return FinetuneConfig(
            hf=HFSource(path=checkpoint, dtype="float32"),
            recipe=RecipeConfig(method=method, target_len=target_len, rope=RopeScaling(type="linear")),
            attention=FTAttention(pattern=pattern, group_size=target_len // 4, sinks=2, backend=backend),
            parallel=ParallelConfig(cp=world_size, strategy="ring", layout="zigzag"),
            data=FTData(source="tokens", tokens_path=tokens_path),
            run=FTRun(out_dir=out_dir, steps=n_steps, save_every=steps // 2, log_every=100),
            train=FTTrain(lr=5e-3, warmup_steps=1),
        )

    results: dict[str, Any] = {}
    for name, out_dir in out_dirs.items():
        summary = finetune(job(name, out_dir, steps), probe_ids=probe)
        results[name] = {"losses": summary["losses"], "rope_parameters": summary["rope_parameters"],
                         # numpy, not tensors: torch shares tensors through file descriptors that die with the rank
                         "probe_ids": probe.numpy(), "probe_logits": summary["probe_logits"].numpy()}
    if resume_dir is not None:
        first = next(iter(out_dirs))
        stopped = finetune(job(first, resume_dir, steps // 2))
        resumed = finetune(job(first, resume_dir, steps))
        results["resumed"] = {"of": first, "losses": resumed["losses"], "ended": [stopped["steps"], resumed["steps"]],
                              "first_loss": resumed["first_loss"], "checkpoint": resumed["checkpoint"]}
    return results


def hf_matrix(rank: int, world_size: int, cp_kwargs: dict[str, Any], ft_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Both checks in one process group (group start-up costs seconds)."""
    return {"cp_failures": cp_equivalence(rank, world_size, **cp_kwargs),
            "finetune": finetune_job(rank, world_size, **ft_kwargs)}


def eval_cp(rank: int, world_size: int, checkpoint: str, tokens_path: str, length: int, prompt: list[int],
            n_new: int) -> dict[str, Any]:
    """Perplexity and greedy decoding of a checkpoint under ring context parallelism (zigzag)."""
    import numpy as np

    from longreach.evaluation.common import greedy_decode
    from longreach.evaluation.perplexity import perplexity
    from longreach.hf.load import load_hf
    from longreach.hf.patch import AttentionPatch, patch_attention

    model, _ = load_hf(checkpoint, dtype=torch.float64, with_tokenizer=False)
    patch_attention(model, AttentionPatch(strategy="ring", layout="zigzag", backend="cpu"))
    res = perplexity(model, np.load(tokens_path), length=length, stride=length // 2)
    return {"ppl": res.ppl, "windows": res.windows, "decoded": greedy_decode(model, prompt, n_new)}


def bf16_engines(rank: int, world_size: int, checkpoint: str, tokens_path: str, out_dir: str,
                 engines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fine-tune the bf16 ``checkpoint`` for 2 steps at lr 2e-5 (dp over all ranks) under each engine;
    returns per engine the trained HF parameters (float32 numpy, full on every rank) or the error text."""
    import longreach.hf.train as hf_train
    from longreach.hf.config import FinetuneConfig, FTAttention, FTData, FTRun, FTTrain, HFSource
    from longreach.hf.train import finetune
    from longreach.hf.recipes import RecipeConfig
    from longreach.job import EngineConfig
    from longreach.parallel.config import ParallelConfig

    built: list[Any] = []
    real = hf_train.build_hf_model
    hf_train.build_hf_model = lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    out: dict[str, Any] = {}
    try:
        for name, engine in engines.items():
            cfg = FinetuneConfig(hf=HFSource(path=checkpoint, dtype="bfloat16"), recipe=RecipeConfig(target_len=64),
                                 attention=FTAttention(backend="cpu"), parallel=ParallelConfig(dp=world_size, cp=1),
                                 data=FTData(source="tokens", tokens_path=tokens_path),
                                 run=FTRun(out_dir=f"{out_dir}/{name}", steps=2),
                                 train=FTTrain(lr=2e-5, warmup_steps=0), engine=EngineConfig(**engine))
            try:
                finetune(cfg)
                out[name] = {n: p.detach().float().numpy().copy() for n, p in built[-1].hf.named_parameters()}
            except Exception as exc:  # noqa: BLE001 - reported per engine in the test
                out[name] = f"{type(exc).__name__}: {exc}"
    finally:
        hf_train.build_hf_model = real
    return out


def deepspeed_lean_resume(rank: int, world_size: int, checkpoint: str, tokens_path: str, out_dir: str,
                          trainable_only: bool) -> dict[str, Any]:
    """DeepSpeed ZeRO-2 bf16 fine-tune (dp over all ranks): 3 steps straight, and 2 steps then resumed to 3
    from the step-2 checkpoint; returns both loss lists and the resumed run's checkpoint folder."""
    from longreach.hf.config import FinetuneConfig, FTAttention, FTCheckpoint, FTData, FTRun, FTTrain, HFSource
    from longreach.hf.train import finetune
    from longreach.hf.recipes import RecipeConfig
    from longreach.job import EngineConfig
    from longreach.parallel.config import ParallelConfig

    def job(name: str, steps: int) -> FinetuneConfig:
        return FinetuneConfig(hf=HFSource(path=checkpoint, dtype="bfloat16"), recipe=RecipeConfig(target_len=64),
                              attention=FTAttention(backend="cpu"), parallel=ParallelConfig(dp=world_size, cp=1),
                              data=FTData(source="tokens", tokens_path=tokens_path),
                              run=FTRun(out_dir=f"{out_dir}/{name}", steps=steps, save_every=1),
                              train=FTTrain(lr=1e-3, warmup_steps=0), checkpoint=FTCheckpoint(trainable_only=trainable_only),
                              engine=EngineConfig(kind="deepspeed", options={"zero_stage": 2}))

    straight = finetune(job("straight", 3))
    finetune(job("resumed", 2))
    resumed = finetune(job("resumed", 3))
    return {"straight": straight["losses"], "resumed": resumed["losses"], "checkpoint": resumed["checkpoint"]}
