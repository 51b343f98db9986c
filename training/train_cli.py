"""``selva train``: one training process (a laptop, a test, one GPU). Multi-process and multi-node runs
launch the same job with ``torchrun -m training.train`` / ``deepspeed --module training.train`` /
``srun python -m training.train`` (docs/training.md)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from training.train import build_parser

    parser = subparsers.add_parser(
        "train",
        help="train a SELVA stage with DeepSpeed (one process; see docs/training.md for launchers)",
        description="Train a SELVA stage (pretrain, encoder = stage 1, generator = stage 2) on precomputed "
        "shards with DeepSpeed, tracked in MLflow, resumable. Overrides: dataset=DIR out=DIR stage=... "
        "steps=N seed=S checkpoint_every=N tracking_uri=URI resume=auto init.textsynch=PATH "
        "init.generator=PATH, or any dotted key of the config (--print-config shows them).",
    )
    build_parser(parser)
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    from training.train import main

    argv = ([f"--config={args.config}"] if args.config else []) + (["--print-config"] if args.print_config else [])
    return main(argv + list(args.overrides))
