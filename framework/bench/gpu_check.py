"""``longreach bench gpu`` (``make gpu-check``): everything worth checking on a machine with one GPU.

One script, one JSON file, under 8 minutes on one recent GPU:

1. **tests** — the ``gpu``-marked tests (compiled Triton block-sparse and lightning kernels against the
   reference, flash-attn / SDPA paths, ring-flash-attn at world size 1), run by pytest in a child process;
2. **throughput** — a ~1B Llama (dim 2048, 16 layers, 16 query / 8 K/V heads of 128, SwiGLU 5632, vocabulary
   32000) training on one GPU in bf16 autocast with fp32 weights, AdamW and activation checkpointing per
   block, at 16k and 64k tokens: tokens/s, model TFLOP/s (6·N per token plus causal attention, recompute not
   counted) and MFU against the device's bf16 peak (:func:`longreach.planning.hardware.peak_flops`);
3. **kernels** — every mask of ``longreach bench kernels`` at 32k tokens (bf16, 16 heads of 128, forward
   and backward) on the ``auto`` CUDA backend against dense causal, in interleaved rounds (median, min, max).

``--dry`` runs the same code on CPU at toy sizes (a 2-layer model at 128/256 tokens, masks at 512 tokens,
the gpu tests only collected), which proves the plumbing without a GPU; its figures mean nothing.

    longreach bench gpu --json runs/gpu_check.json
    longreach bench gpu --dry --json /tmp/gpu_dry.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from longreach.errors import UserError

__all__ = ["main", "Sizes", "model_flops_per_token"]


@dataclass(kw_only=True, slots=True)
class Sizes:
    """What one run measures (the GPU sizes, or the toy sizes of ``--dry``)."""

    dim: int = 2048
    """Model width."""
    n_layers: int = 16
    """Decoder blocks."""
    n_heads: int = 16
    """Query heads."""
    n_kv_heads: int = 8
    """K/V heads."""
    ffn_hidden: int = 5632
    """SwiGLU hidden size."""
    vocab_size: int = 32000
    """Vocabulary."""
    seq_lens: tuple[int, ...] = (16384, 65536)
    """Training lengths of the throughput table."""
    steps: int = 3
    """Measured optimizer steps per length (after one warm-up step)."""
    mask_seq_len: int = 32768
    """Tokens of the mask kernel table."""
    mask_heads: int = 16
    """Heads of the mask kernel table."""
    mask_head_dim: int = 128
    """Head size of the mask kernel table."""
    rounds: int = 5
    """Interleaved rounds of the mask kernel table."""


DRY = Sizes(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=256, seq_lens=(128, 256),
            steps=1, mask_seq_len=512, mask_heads=2, mask_head_dim=16, rounds=1)


def model_flops_per_token(n_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (matmuls, forward + backward) plus causal attention,
    3 passes × 2 matmuls × 2 FLOPs × (S/2 keys on average) × H·D per layer."""
    return 6.0 * n_params + n_layers * 3 * 2 * 2 * (seq_len / 2) * n_heads * head_dim


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_tests(dry: bool, timeout_s: int) -> dict[str, Any]:
    """The gpu-marked tests in a child pytest (collected only under ``--dry``)."""
    root = Path(__file__).resolve()
    repo = next((p for p in root.parents if (p / "tests").is_dir() and (p / "pyproject.toml").exists()), None)
    if repo is None:
        return {"skipped": "no tests/ folder beside this installation (run from a source checkout)"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
    if dry:
        cmd.insert(-1, "--collect-only")
    env = dict(os.environ, PYTHONSAFEPATH="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "timed_out": True, "seconds": timeout_s}
    lines = proc.stdout.strip().splitlines()
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": time.perf_counter() - t0,
            "collected": [x for x in lines if "::" in x] if dry else None, "summary": lines[-1] if lines else "",
            "tail": "\n".join(lines[-30:]) if proc.returncode not in (0, 5) else ""}


def run_throughput(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Tokens/s, TFLOP/s and MFU of the ~1B Llama at each length (one sequence per step)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    from longreach.attention import AttentionContext
    from longreach.models import build_model
    from longreach.models.config import ModelConfig
    from longreach.planning.hardware import peak_flops

    rows = []
    for s in sizes.seq_lens:
        torch.manual_seed(0)
        cfg = ModelConfig(arch="llama", vocab_size=sizes.vocab_size, dim=sizes.dim, n_layers=sizes.n_layers,
                          n_heads=sizes.n_heads, n_kv_heads=sizes.n_kv_heads, ffn_hidden=sizes.ffn_hidden,
                          max_seq_len=s)
        model = build_model(cfg).to(device)
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        n_params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
        ids = torch.randint(0, cfg.vocab_size, (1, s + 1), device=device)
        ctx = AttentionContext(seq_len=s)

        def step() -> float:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss_sum, n_tok = model(ids[:, :-1], ctx=ctx, labels=ids[:, 1:])
            loss = loss_sum / n_tok
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step()  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        losses = [step() for _ in range(sizes.steps)]
        _sync(device)
        seconds = (time.perf_counter() - t0) / sizes.steps
        flops = model_flops_per_token(n_params, cfg.n_layers, cfg.n_heads, cfg.head_dim, s) * s
        peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None, dtype)
        rows.append({"seq_len": s, "params_non_embedding": n_params, "seconds_per_step": seconds,
                     "tokens_per_s": s / seconds, "tflops": flops / seconds / 1e12,
                     "mfu": None if peak is None else flops / seconds / peak, "loss": losses[-1],
                     "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                         if device.type == "cuda" else None)})
        print(f"  throughput S={s}: {rows[-1]['tokens_per_s']:.0f} tokens/s, {rows[-1]['tflops']:.1f} TFLOP/s",
              file=sys.stderr, flush=True)
        del model, opt
    return rows


def run_kernels(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Every mask vs dense causal on the ``auto`` backend, forward + backward, interleaved rounds."""
    from longreach.bench.kernels import MASK_NAMES, build_mask, interleaved, mask_density, target_ratio
    from longreach.kernels import attention

    s, h, d = sizes.mask_seq_len, sizes.mask_heads, sizes.mask_head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, s, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    masks = {name: build_mask(name, s, window=1024 if s >= 4096 else s // 8, block=128 if s >= 4096 else 32, seed=0)
             for name in MASK_NAMES}

    def fn(mask) -> Callable[[], None]:
        def go() -> None:
            out = attention(q, k, v, mask=mask, backend="auto")
            out.backward(torch.ones_like(out))
            _sync(device)
        return go

    ratios = interleaved({name: fn(mask) for name, mask in masks.items()}, "causal", sizes.rounds)
    causal_density = (s + 1) / (2 * s)
    rows = []
    for name, mask in masks.items():
        ideal = mask_density(mask, s, h) / causal_density
        xs = ratios[name]
        rows.append({"mask": name, "ideal": ideal, "target": target_ratio(name, ideal),
                     "median": statistics.median(xs), "min": min(xs), "max": max(xs)})
    rows.append({"mask": "causal seconds", "median": statistics.median(ratios["_baseline_seconds"])})
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="toy sizes on CPU (plumbing only; no GPU needed)")
    p.add_argument("--json", default="gpu_check.json", help="result file (default gpu_check.json)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: tests, throughput, kernels")
    p.add_argument("--test-timeout", type=int, default=240, help="seconds for the gpu tests (default 240)")
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``longreach bench gpu``."""
    from longreach.planning.hardware import hardware_info, software_versions

    args = build_parser().parse_args(argv)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    unknown = skip - {"tests", "throughput", "kernels"}
    if unknown:
        raise UserError(f"bench gpu --skip: unknown section(s) {sorted(unknown)}; "
                        "choose from tests, throughput, kernels")
    if not args.dry and not torch.cuda.is_available():
        raise UserError("bench gpu: no CUDA device here; run with --dry to check the plumbing on CPU")
    out_path = Path(args.json)
    if out_path.parent and not out_path.parent.exists():
        raise UserError(f"bench gpu --json: folder {str(out_path.parent)!r} does not exist")
    device = torch.device("cpu" if args.dry else "cuda")
    sizes, dtype = (DRY, torch.float32) if args.dry else (Sizes(), torch.bfloat16)
    result: dict[str, Any] = {"dry": args.dry, "hardware": hardware_info(), "software": software_versions(),
                              "sizes": {k: getattr(sizes, k) for k in Sizes.__slots__}, "dtype": str(dtype)}
    t0 = time.perf_counter()
    if "tests" not in skip:
        print("bench gpu: gpu-marked tests", file=sys.stderr, flush=True)
        result["tests"] = run_tests(args.dry, args.test_timeout)
    if "throughput" not in skip:
        print("bench gpu: 1B Llama throughput", file=sys.stderr, flush=True)
        result["throughput"] = run_throughput(sizes, device, dtype)
    if "kernels" not in skip:
        print("bench gpu: mask kernels vs causal", file=sys.stderr, flush=True)
        result["kernels"] = run_kernels(sizes, device, dtype)
    result["seconds"] = time.perf_counter() - t0
    out_path.write_text(json.dumps(result, indent=1, default=str))
    for row in result.get("throughput", []):
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"S={row['seq_len']:>6}  {row['tokens_per_s']:>10.0f} tokens/s  {row['tflops']:>7.1f} TFLOP/s  MFU {mfu}")
    for row in result.get("kernels", []):
        if "ideal" in row:
            print(f"{row['mask']:<14} time/causal {row['median']:.3f} [{row['min']:.3f}-{row['max']:.3f}]  "
                  f"ideal {row['ideal']:.3f}  target {row['target']:.3f}")
    if "tests" in result:
        print(f"gpu tests: {result['tests'].get('summary', result['tests'])}")
    note = ", dry run: figures mean nothing" if args.dry else ""
    print(f"bench gpu: wrote {out_path} ({result['seconds']:.0f} s{note})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
