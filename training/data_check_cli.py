"""``selva data check DATASET``: dry-run the training loader (see training/data_check.py).

Exit status: 0 when every rank gets the same number of batches and every epoch sees every sample;
1 when not; 2 when the data cannot be opened (not a dataset, missing shards, unknown counts).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="inspect how training will read a dataset")
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND")
    parser = commands.add_parser(
        "check",
        help="run the training loader as N ranks x W workers would, without training",
        description="Run the real training loader over DATASET (a dataset folder, or shard URLs: paths, "
        "file:, pipe:CMD, http(s)://, with {000..009} brace ranges) as --ranks ranks with --workers "
        "DataLoader workers each would (ranks simulated one after another in this process). Prints batches "
        "per rank, unique/repeated/missed samples per epoch, samples/s, peak RSS and mixing statistics. "
        "Exits 1 if ranks would get unequal step counts or an epoch misses a sample.",
    )
    parser.add_argument("dataset", nargs="+", metavar="DATASET", help="dataset folder or shard URL(s)")
    parser.add_argument("--ranks", type=int, default=1, help="simulated world size (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="batch size per rank (default 8)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--mix-prob", type=float, default=0.5, help="mixing probability (0 disables mixing)")
    parser.add_argument("--alpha", type=float, default=1.0, help="Beta(alpha, alpha) for lambda")
    parser.add_argument("--constant-lambda", type=float, default=None)
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="raw samples per worker's shuffle buffer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--allow-partial", action="store_true", help="read only the done shards of the split")
    parser.add_argument(
        "--samples-per-epoch",
        type=int,
        default=None,
        help="epoch length for shard URLs without markers (their sample counts are unknown)",
    )
    parser.set_defaults(func=run)
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])


def run(args: argparse.Namespace) -> int:
    from preprocessing.shards import ShardError
    from selva.mixing import MixConfig
    from training.data_check import format_report, run_check
    from training.loader import LoaderConfig
    from training.shard_order import open_source

    try:
        source = open_source(
            args.dataset,
            split=args.split,
            allow_partial=args.allow_partial,
            samples_per_epoch=args.samples_per_epoch,
        )
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = LoaderConfig(
        batch_size=args.batch, num_workers=args.workers, shuffle_buffer=args.shuffle_buffer, seed=args.seed
    )
    mix = (
        MixConfig(prob=args.mix_prob, alpha=args.alpha, constant_lambda=args.constant_lambda, seed=args.seed)
        if args.mix_prob > 0
        else None
    )
    report = run_check(source, cfg, ranks=args.ranks, epochs=args.epochs, mix=mix)
    for line in format_report(report, source):
        print(line)
    problems = report.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("result: " + ("FAILED" if problems else "OK"))
    return 1 if problems else 0
