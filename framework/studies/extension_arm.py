"""One fine-tuning arm of ``longreach study extension``, varied, on a finished run's base and data.

The study's LoRA recipes fail to retrieve at 4L where full fine-tuning succeeds; the recipe header and the
study's "why" quote which of their restrictions (rank, frozen MLPs, the sparse training pattern) that takes,
measured by this tool: it fine-tunes one arm from the run folder's pre-trained base on its fine-tuning data,
evaluates it as the study does (perplexity at L, 2L, 4L, passkey by depth at L and 4L, the digit-copy loss),
and writes ``arm.json`` in its own folder. The run folder is only read.

    python -m longreach.studies.extension_arm runs/study-extension runs/arm-r64-mlp-full \\
        --method longlora --rank 64 --mlp --attention full --steps 1800
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from longreach.hf.recipes import ATTENTION_TARGETS
from longreach.studies.extension import ExtensionConfig, RECIPES, _evaluate, _finetune, far_accuracy

#: LoRA on the MLP too (``--mlp``): these beside the recipe's attention projections.
MLP = ("gate_proj", "up_proj", "down_proj")
#: The run folder's files the arm reads.
NEEDED = ("study-run.json", "base_hf", "finetune_tokens.npy", "val_tokens.npy")


class ArmError(Exception):
    """A bad run folder, output folder or setting (the CLI prints it and exits 2)."""


def run_config(run: Path) -> ExtensionConfig:
    """The run folder's recipe (``study-run.json``), the one its base and data were made with."""
    missing = [n for n in NEEDED if not (run / n).exists()]
    if missing:
        raise ArmError(f"{run} is not a finished extension study run folder: missing {', '.join(missing)}")
    marker = json.loads((run / "study-run.json").read_text())
    if marker.get("study") != "extension":
        raise ArmError(f"{run} holds study {marker.get('study')!r}, not extension")
    names = {f.name for f in dataclasses.fields(ExtensionConfig)}
    return ExtensionConfig(**{k: v for k, v in marker["config"].items() if k in names})


def arm(run: Path, out: Path, *, method: str = "longlora", attention: str | None = None, rank: int | None = None,
        steps: int | None = None, mlp: bool = False) -> dict[str, Any]:
    """Fine-tune and evaluate one arm into ``out`` (created; links to the run's base and data); its record."""
    cfg = run_config(run)
    cfg = dataclasses.replace(cfg, lora_rank=rank or cfg.lora_rank, finetune_steps=steps or cfg.finetune_steps)
    pattern = attention or dict(RECIPES.values())[method]
    if method == "full" and mlp:
        raise ArmError("--mlp adds LoRA adapters: full fine-tuning (--method full) trains every weight already")
    if out.resolve() == run.resolve():
        raise ArmError(f"the arm's folder must not be the run folder {run}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("base_hf", "finetune_tokens.npy"):
        if not (out / name).exists():
            (out / name).symlink_to((run / name).resolve())
    t = time.perf_counter()
    ft = _finetune(cfg, out, method, pattern, lora_targets=[*ATTENTION_TARGETS, *MLP] if mlp else None)
    seconds = time.perf_counter() - t
    ev = _evaluate(Path(ft["export"]), np.load(run / "val_tokens.npy"), cfg)
    record = {"method": method, "attention": pattern, "lora_rank": cfg.lora_rank, "mlp": mlp,
              "steps": cfg.finetune_steps, "finetune_s": seconds, **ft, **ev, "far": far_accuracy(cfg, ev)}
    (out / "arm.json").write_text(json.dumps(record, indent=1, default=float))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longreach.studies.extension_arm", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished `longreach study extension` run folder (read only)")
    p.add_argument("out", type=Path, help="this arm's folder (created)")
    p.add_argument("--method", default="longlora", choices=sorted({m for m, _ in RECIPES.values()}))
    p.add_argument("--attention", default=None, choices=("full", "s2", "sf"),
                   help="training attention pattern (default: the method's, as in the study)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank, alpha twice it (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the run's)")
    p.add_argument("--mlp", action="store_true", help="LoRA on gate/up/down too, beside q/k/v/o")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        if args.rank is not None and args.rank < 1 or args.steps is not None and args.steps < 1:
            raise ArmError("--rank and --steps must be >= 1")
        rec = arm(args.run, args.out, method=args.method, attention=args.attention, rank=args.rank,
                  steps=args.steps, mlp=args.mlp)
    except (ArmError, ValueError) as e:
        print(f"extension_arm: error: {e}", file=sys.stderr)
        return 2
    n1, n4 = rec["passkey"]  # the lengths evaluated: L and 4L
    print(f"{rec['method']} {rec['attention']} rank {rec['lora_rank']}{' +MLP' if rec['mlp'] else ''} "
          f"{rec['steps']} steps: passkey @{n1} {np.mean(rec['passkey'][n1]):.2f}, @{n4} "
          f"{np.mean(rec['passkey'][n4]):.2f} (keys farther than L {rec['far']:.2f}), digit-copy loss "
          f"{rec['copy_nll']:.3f}, ppl @{n4} {rec['ppl'][n4]:.2f}; {args.out / 'arm.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
