"""Before/after study: extend a tiny longreach-pretrained model 4x with each recipe (CPU, minutes).

    python -m longreach.hf.study [--out runs/hf_study] [--pretrain-steps N] [--finetune-steps N]

1. Pretrain a tiny Llama with longreach on its embedded data (standard-library docstrings + passkey and
   associative-recall tasks, digits one token each) at 1x context L, export it to HF (weights, config,
   sentencepiece tokenizer files). Task documents are at most ~L tokens long, so a training window holds
   whole tasks; every window is a random slice of the token stream.
2. Extend it to 4L from the HF checkpoint with LongLoRA (LoRA + S2-Attn), SinkLoRA (LoRA + SF-Attn +
   sinks) and full fine-tuning (S2-Attn; and, as a control, with full attention), each with linear position
   interpolation, then export. The
   fine-tuning data are the same training docstrings with tasks up to ~4L tokens long.
3. Evaluate the base model and every export: perplexity (LongLoRA protocol: windows every 256 tokens)
   on held-out docstring documents, and passkey accuracy (LongLoRA protocol: greedy decoding, exact
   match; ``seeds`` keys x 5 depths per length) at 1x and 4x; write ``study.md`` / ``study.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@dataclass(kw_only=True, slots=True)
class StudySettings:
    """Everything the study's numbers depend on (written into ``study.json``)."""

    seq_len: int = 128
    """Pre-training context L (fine-tuning and the long evaluation: factor x L)."""
    factor: int = 4
    """Context extension factor."""
    dim: int = 128
    """Base model width."""
    n_layers: int = 2
    """Base model depth."""
    n_heads: int = 4
    """Base model attention heads (as many key/value heads)."""
    pretrain_steps: int = 3000
    """Base model optimizer steps."""
    batch: int = 16
    """Base model sequences per step."""
    lr: float = 3e-3
    """Base model peak learning rate (AdamW, 30 warm-up steps, linear decay to 10%)."""
    vocab_size: int = 512
    """Tokenizer pieces (digits split one per piece)."""
    harvest_chars: int = 400_000
    """Standard-library docstring characters."""
    passkey_fraction: float = 0.75
    """Share of documents that are passkey tasks."""
    recall_fraction: float = 0.2
    """Share of documents that are associative-recall tasks."""
    task_chars: int = 500
    """Longest pre-training task document in characters (fine-tuning: factor x this)."""
    finetune_steps: int = 600
    """Optimizer steps of each extension recipe."""
    finetune_batch: int = 4
    """Sequences of factor x L tokens per fine-tuning step."""
    lora_lr: float = 2e-3
    """Learning rate of the LoRA recipes."""
    full_lr: float = 5e-4
    """Learning rate of full fine-tuning."""
    seeds: int = 10
    """Passkey keys per (length, depth)."""
    ppl_windows: int = 16
    """Perplexity windows per length."""
    seed: int = 0
    """Seed of data, initialisation and batches."""


def _documents(s: StudySettings, cache: Path, *, task_chars: int, tokenizer: str | None = None) -> tuple[Any, list[str], int]:
    """(tokenizer, documents, number of leading docstring documents) of the embedded corpus."""
    from longreach.data.config import DataConfig
    from longreach.data.corpus import corpus_documents
    from longreach.data.harvest import harvest_docstrings
    from longreach.data.tokenizer import load_or_train_tokenizer

    dcfg = DataConfig(source="embedded", harvest_chars=s.harvest_chars, vocab_size=s.vocab_size,
                      passkey_fraction=s.passkey_fraction, recall_fraction=s.recall_fraction, task_chars=task_chars,
                      split_digits=True, seed=s.seed, cache_dir=str(cache), tokenizer=tokenizer)
    n_text = len(list(harvest_docstrings(s.harvest_chars)))
    return load_or_train_tokenizer(dcfg), corpus_documents(dcfg), n_text


def _encode(tok: Any, docs: list[str], idx: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray([tok.bos_id] + tok.encode(docs[int(i)]) + [tok.eos_id], dtype=np.int64)
                           for i in idx])


def _pretrain(out: Path, s: StudySettings) -> tuple[Path, np.ndarray]:
    """Train the tiny base model and write the fine-tuning tokens; returns (HF export, held-out text tokens)."""
    from longreach.hf.convert import save_hf
    from longreach.models import ModelConfig, build_model

    t0 = time.time()
    tok, docs, n_text = _documents(s, out / "cache", task_chars=s.task_chars)
    rng = np.random.default_rng(s.seed)
    held = np.sort(rng.permutation(n_text)[:max(4, n_text // 20)])  # held-out docstring documents
    keep = np.setdiff1d(np.arange(len(docs)), held)
    train = _encode(tok, docs, rng.permutation(keep))  # [N]
    val = _encode(tok, docs, held)  # [N_val] natural text only
    # fine-tuning data: the same training docstrings, tasks up to factor x longer (fresh keys)
    _, long_docs, _ = _documents(s, out / "cache", task_chars=s.factor * s.task_chars, tokenizer=str(tok.path))
    long_keep = np.setdiff1d(np.arange(len(long_docs)), held)
    np.save(out / "finetune_tokens.npy", _encode(tok, long_docs, rng.permutation(long_keep)))
    np.save(out / "val_tokens.npy", val)
    print(f"data: {len(docs)} documents ({n_text} docstring modules, {len(held)} held out), {len(train)} "
          f"pre-training tokens, {len(val)} held-out tokens ({time.time() - t0:.0f}s)", flush=True)
    torch.manual_seed(s.seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads,
                      max_seq_len=s.seq_len)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps = s.pretrain_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 30) * max(0.1, 1 - k / steps))
    stream = torch.as_tensor(train)
    span = torch.arange(s.seq_len + 1)
    for step in range(steps):
        starts = torch.as_tensor(rng.integers(0, len(train) - s.seq_len - 1, s.batch))
        x = stream[starts[:, None] + span]  # [B, L+1]
        loss_sum, n = model(x[:, :-1], labels=x[:, 1:])
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"pretrain step {step} loss {float(loss.detach()):.3f} ({time.time() - t0:.0f}s)", flush=True)
    return save_hf(model.eval(), out / "base_hf", sp_model_file=tok.path), val


def _evaluate(checkpoint: Path, val: np.ndarray, *, lengths: list[int], seeds: int, max_windows: int) -> dict[str, Any]:
    from longreach.evaluation.passkey import accuracy_table, passkey_retrieval
    from longreach.evaluation.perplexity import perplexity
    from longreach.hf.load import load_hf
    from longreach.hf.patch import AttentionPatch, patch_attention

    model, tok = load_hf(checkpoint, dtype=torch.float32)
    patch_attention(model, AttentionPatch(backend="cpu"))
    res: dict[str, Any] = {}
    for n in lengths:
        ppl = perplexity(model, val, length=n, stride=256, max_windows=max_windows)
        recs = passkey_retrieval(model, tok, lengths=[n], depths=DEPTHS, seeds=seeds)
        table = accuracy_table(recs)
        res[n] = {"ppl": ppl.ppl, "windows": ppl.windows, "passkey": table["overall"],
                  "passkey_by_depth": table["accuracy"][0], "passkey_samples": len(recs),
                  "examples": [(r.answer, r.generated) for r in recs[:: max(1, len(recs) // 5)]]}
    return res


def run_study(out: Path, s: StudySettings | None = None) -> dict[str, Any]:
    from longreach.hf.config import FinetuneConfig, FTAttention, FTData, FTRun, FTTrain, HFSource
    from longreach.hf.train import finetune
    from longreach.hf.recipes import RecipeConfig
    from longreach.hf.rope import RopeScaling
    from longreach.parallel.config import ParallelConfig

    s = s or StudySettings()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base, val = _pretrain(out, s)
    lengths = [s.seq_len, s.factor * s.seq_len]
    ev = dict(lengths=lengths, seeds=s.seeds, max_windows=s.ppl_windows)
    rows: dict[str, Any] = {"base (no fine-tune)": _evaluate(base, val, **ev)}
    print(f"base: {rows['base (no fine-tune)']} ({time.time() - t0:.0f}s)", flush=True)
    recipes = {"LongLoRA (LoRA + S2)": ("longlora", "s2", s.lora_lr),
               "SinkLoRA (LoRA + SF + 4 sinks)": ("sinklora", "sf", s.lora_lr),
               "full fine-tune (S2)": ("full", "s2", s.full_lr),
               "full fine-tune (full attention, control)": ("full", "full", s.full_lr)}
    for name, (method, pattern, lr) in recipes.items():
        run = out / f"{method}_{pattern}"
        cfg = FinetuneConfig(
            hf=HFSource(path=str(base), dtype="float32"),
            recipe=RecipeConfig(method=method, target_len=s.factor * s.seq_len, rope=RopeScaling(type="linear")),
            attention=FTAttention(pattern=pattern, backend="cpu"),
            parallel=ParallelConfig(cp=1),
            data=FTData(source="tokens", tokens_path=str(out / "finetune_tokens.npy"), seed=s.seed),
            run=FTRun(out_dir=str(run), steps=s.finetune_steps, log_every=20, seed=s.seed, overwrite=True),
            train=FTTrain(lr=lr, warmup_steps=5, micro_batch_size=s.finetune_batch),
        )
        summary = finetune(cfg)
        rows[name] = _evaluate(run / "export", val, **ev)
        rows[name]["trainable_fraction"] = summary["trainable"]["fraction"]
        print(f"{name}: {rows[name]} ({time.time() - t0:.0f}s)", flush=True)
    result = {"seq_len": s.seq_len, "factor": s.factor, "settings": asdict(s),
              "passkey_samples_per_length": len(DEPTHS) * s.seeds, "rows": rows, "seconds": time.time() - t0}
    (out / "study.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "study.md").write_text(markdown(result) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    n1, n4 = result["seq_len"], result["seq_len"] * result["factor"]
    lines = [f"| model | trainable | ppl @{n1} | ppl @{n4} | passkey @{n1} | passkey @{n4} |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        frac = r.get("trainable_fraction")
        lines.append(f"| {name} | {'-' if frac is None else f'{100 * frac:.1f}%'} | {r[n1]['ppl']:.2f} | "
                     f"{r[n4]['ppl']:.2f} | {r[n1]['passkey']:.2f} | {r[n4]['passkey']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longreach.hf.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/hf_study")
    p.add_argument("--threads", type=int, default=2)
    defaults = StudySettings()
    for name in StudySettings.__slots__:
        value = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = StudySettings(**{name: getattr(args, name) for name in StudySettings.__slots__})
    res = run_study(Path(args.out), s)
    print(markdown(res))
    print(f"total {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
