"""The ``selva`` command line: one entry point, one subcommand per job.

Subcommands register themselves through ``add_parser(subparsers)`` functions so each job's
options live next to its code; heavy imports (Ray, DeepSpeed, MLflow) happen only inside the
subcommand that needs them, so ``selva --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def _add_presets(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "presets",
        help="list the model presets and their sizes",
        description="List the model presets (the four released sizes small_16k, small_44k, medium_44k, "
        "large_44k, and the tiny / tiny_44k laptop presets) with audio rate, clip duration, frame size, "
        "sequence lengths and parameter counts.",
    )
    parser.set_defaults(func=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    import torch

    from selva.presets import PRESETS

    header = f"{'preset':<10} {'audio Hz':>8} {'clip s':>6} {'frame':>5} {'latent':>6} {'sync':>5}"
    print(f"{header} {'TextSynch M':>11} {'generator M':>11}")
    for preset in PRESETS.values():
        seq = preset.seq
        with torch.device("meta"):  # shapes only: counting a 1 B-parameter model allocates nothing
            ts = sum(p.numel() for p in preset.build_textsynch().parameters()) / 1e6
            gen = sum(p.numel() for p in preset.build_generator().parameters()) / 1e6
        print(
            f"{preset.name:<10} {seq.sampling_rate:>8} {preset.duration:>6.1f} {preset.frame_size:>5} "
            f"{seq.latent_seq_len:>6} {seq.sync_seq_len:>5} {ts:>11.2f} {gen:>11.2f}"
        )
    return 0


def _add_optional(subparsers: Any, module: str) -> None:
    """Register a job's subcommand; its module imports its heavy dependencies lazily."""
    import importlib

    importlib.import_module(module).add_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    from selva import __version__
    from selva.reference import check

    parser = argparse.ArgumentParser(
        prog="selva",
        description="SELVA at cluster scale: precompute shards, train both stages, generate audio.",
    )
    parser.add_argument("--version", action="version", version=f"selva {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    check.add_parser(subparsers)
    _add_optional(subparsers, "preprocessing.inspect_cli")
    _add_optional(subparsers, "pipelines.precompute_cli")
    _add_optional(subparsers, "training.data_check_cli")
    _add_optional(subparsers, "training.train_cli")
    _add_optional(subparsers, "training.generate_cli")
    _add_optional(subparsers, "training.benchmark_cli")
    _add_optional(subparsers, "training.evaluate_cli")
    _add_presets(subparsers)
    _add_optional(subparsers, "pipelines.synth_world")
    _add_optional(subparsers, "pipelines.demo")
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a bad input or set-up (each names the input): one line, no traceback.
    Anything else is a bug of ours and keeps its traceback."""
    from pipelines.precompute import PrecomputeError
    from pipelines.synth_benchmark import SynthBenchmarkError
    from pipelines.synth_world import SynthError
    from preprocessing.input_table import ManifestError
    from preprocessing.shards import ShardError
    from selva.checkpoint import CheckpointError
    from selva.reference.check import ReferenceFormatError
    from selva.reference.inputs import InputError
    from selva.weights import MissingWeightsError
    from training.benchmark_read import BenchmarkError
    from training.embedders import EmbedderUnavailable
    from training.evaluate_data import EvaluationError
    from training.generate import GenerationError

    return (
        PrecomputeError, ManifestError, ShardError, CheckpointError, ReferenceFormatError, InputError,
        MissingWeightsError, BenchmarkError, EvaluationError, EmbedderUnavailable, FileNotFoundError,
        IsADirectoryError, NotADirectoryError, PermissionError, GenerationError, SynthError, SynthBenchmarkError,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept (rerun the same command to resume; a training job resumes "
              "from its last checkpoint: stop it with SIGTERM to write one first)", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug or not isinstance(err, expected_errors()):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
