"""Before/after study: extend a tiny longreach-pretrained model 4x with each recipe (CPU, minutes).

    python -m longreach.hf.study [--out runs/hf_study] [--pretrain-steps 200] [--finetune-steps 40]

1. Pretrain a tiny Llama with longreach on its embedded data (standard-library docstrings + passkey
   tasks) at 1x context L, export it to HF (weights, config, sentencepiece tokenizer files).
2. Extend it to 4L from the HF checkpoint with LongLoRA (LoRA + S2-Attn), SinkLoRA (LoRA + SF-Attn +
   sinks) and full fine-tuning (S2-Attn), each with linear position interpolation, then export.
3. Evaluate the base model and every export: perplexity (LongLoRA protocol, held-out documents) and
   passkey accuracy (depths 0 … 1) at 1x and 4x; write ``study.md`` / ``study.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _pretrain(out: Path, *, seq_len: int, steps: int, batch: int, seed: int) -> tuple[Path, np.ndarray]:
    """Train the tiny base model; returns (its HF export folder, held-out tokens)."""
    from longreach.data.config import DataConfig
    from longreach.data.corpus import corpus_documents
    from longreach.data.tokenizer import load_or_train_tokenizer
    from longreach.hf.convert import save_hf
    from longreach.models import ModelConfig, build_model

    dcfg = DataConfig(source="embedded", harvest_chars=400_000, vocab_size=512, passkey_fraction=0.3,
                      recall_fraction=0.0, task_chars=6000, seed=seed, cache_dir=str(out / "cache"))
    tok = load_or_train_tokenizer(dcfg)
    docs = corpus_documents(dcfg)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    n_val = max(4, len(docs) // 20)
    encode = lambda idx: np.concatenate([np.asarray([tok.bos_id] + tok.encode(docs[i]) + [tok.eos_id]) for i in idx])
    train, val = encode(order[n_val:]), encode(order[:n_val])
    np.save(out / "train_tokens.npy", train)
    np.save(out / "val_tokens.npy", val)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=seq_len)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    n_win = len(train) // (seq_len + 1)
    windows = torch.as_tensor(train[:n_win * (seq_len + 1)]).view(n_win, seq_len + 1)
    t0 = time.time()
    for step in range(steps):
        idx = torch.as_tensor(rng.integers(0, n_win, batch))
        x = windows[idx]  # [B, L+1]
        loss_sum, n = model(x[:, :-1], labels=x[:, 1:])
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 50 == 0 or step == steps - 1:
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
        recs = passkey_retrieval(model, tok, lengths=[n], depths=[0.0, 0.25, 0.5, 0.75, 1.0], seeds=seeds)
        res[n] = {"ppl": ppl.ppl, "windows": ppl.windows, "passkey": accuracy_table(recs)["overall"]}
    return res


def run_study(out: Path, *, seq_len: int = 256, factor: int = 4, pretrain_steps: int = 200,
              finetune_steps: int = 40, seeds: int = 2, max_windows: int = 8, seed: int = 0) -> dict[str, Any]:
    from longreach.hf.cli import FinetuneConfig, FTAttention, FTData, FTRun, FTTrain, HFSource, finetune
    from longreach.hf.recipes import RecipeConfig
    from longreach.parallel.config import ParallelConfig
    from longreach.hf.rope import RopeScaling

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base, val = _pretrain(out, seq_len=seq_len, steps=pretrain_steps, batch=8, seed=seed)
    lengths = [seq_len, factor * seq_len]
    rows: dict[str, Any] = {"base (no fine-tune)": _evaluate(base, val, lengths=lengths, seeds=seeds,
                                                              max_windows=max_windows)}
    recipes = {"LongLoRA (LoRA + S2)": ("longlora", "s2", 2e-3), "SinkLoRA (LoRA + SF + 4 sinks)": ("sinklora", "sf", 2e-3),
               "full fine-tune (S2)": ("full", "s2", 3e-4)}
    for name, (method, pattern, lr) in recipes.items():
        run = out / method
        cfg = FinetuneConfig(
            hf=HFSource(path=str(base), dtype="float32"),
            recipe=RecipeConfig(method=method, target_len=factor * seq_len, rope=RopeScaling(type="linear")),
            attention=FTAttention(pattern=pattern, backend="cpu"),
            parallel=ParallelConfig(cp=1),
            data=FTData(source="tokens", tokens_path=str(out / "train_tokens.npy"), seed=seed),
            run=FTRun(out_dir=str(run), steps=finetune_steps, log_every=20, seed=seed, overwrite=True),
            train=FTTrain(lr=lr, warmup_steps=5, micro_batch_size=2),
        )
        summary = finetune(cfg)
        rows[name] = _evaluate(run / "export", val, lengths=lengths, seeds=seeds, max_windows=max_windows)
        rows[name]["trainable_fraction"] = summary["trainable"]["fraction"]
        print(f"{name}: {rows[name]} ({time.time() - t0:.0f}s)", flush=True)
    result = {"seq_len": seq_len, "factor": factor, "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
              "passkey_samples_per_length": 5 * seeds, "rows": rows, "seconds": time.time() - t0}
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
    p.add_argument("--seq-len", type=int, default=256, help="pre-training context L (fine-tuning: 4L)")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--seeds", type=int, default=2, help="passkey samples per (length, depth)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run_study(Path(args.out), seq_len=args.seq_len, pretrain_steps=args.pretrain_steps,
                    finetune_steps=args.finetune_steps, seeds=args.seeds)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
