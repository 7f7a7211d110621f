"""``longreach finetune CONFIG [--section.field=value …]``: extend an HF checkpoint's context.

The job's config is :class:`~longreach.hf.config.FinetuneConfig`, its data :mod:`longreach.hf.data`, its
driver :func:`longreach.hf.train.finetune`; this module only reads the command line.
"""
from __future__ import annotations

import argparse
import sys

from longreach.configio import load_config
from longreach.errors import UserError
from longreach.hf.config import FinetuneConfig
from longreach.hf.train import finetune

__all__ = ["finetune_main", "main"]


def finetune_main(argv: list[str] | None = None) -> int:
    """``longreach finetune CONFIG [--section.field=value …]``."""
    p = argparse.ArgumentParser(prog="longreach finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML recipe (a file or a packaged name such as longlora_tiny_cpu)")
    p.add_argument("overrides", nargs="*", help="--section.field=value overrides")
    args, extra = p.parse_known_args(argv)
    try:
        cfg = load_config(FinetuneConfig, args.config, list(args.overrides) + extra)
        finetune(cfg)
    except UserError as e:
        print(f"longreach: error: {e}", file=sys.stderr)
        return 2
    return 0


main = finetune_main
