"""The ``selva`` command line: one entry point, one subcommand per job.

Subcommands register themselves through ``add_parser(subparsers)`` functions so each job's
options live next to its code; heavy imports (Ray, DeepSpeed, MLflow) happen only inside the
subcommand that needs them, so ``selva --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any


def _add_presets(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "presets",
        help="list the model presets and their sizes",
        description="List the model presets (official small_16k and the tiny test preset) with "
        "clip duration, frame size, sequence lengths and parameter counts.",
    )
    parser.set_defaults(func=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    from selva.presets import PRESETS

    header = f"{'preset':<10} {'clip s':>6} {'frame':>5} {'latent':>6} {'sync':>5}"
    print(f"{header} {'TextSynch M':>11} {'generator M':>11}")
    for preset in PRESETS.values():
        seq = preset.seq
        ts = sum(p.numel() for p in preset.build_textsynch().parameters()) / 1e6
        gen = sum(p.numel() for p in preset.build_generator().parameters()) / 1e6
        print(
            f"{preset.name:<10} {preset.duration:>6.1f} {preset.frame_size:>5} {seq.latent_seq_len:>6} "
            f"{seq.sync_seq_len:>5} {ts:>11.2f} {gen:>11.2f}"
        )
    return 0


def _add_demo(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the embedded-default demo (no downloads)",
        description="Run the end-to-end demo on the embedded default. The full job (precompute -> "
        "train -> generate) is not built yet; until it lands this runs the tiny model end to end "
        "on a synthetic clip: TextSynch encoding, then 25-step CFG sampling of audio latents.",
    )
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from selva.presets import get_preset
    from selva.sampling import sample_latents

    print("selva demo: the full precompute -> train -> generate job is not built yet.")
    print(f"Running the {args.preset} model on a synthetic clip instead (random weights, no downloads).")
    preset = get_preset(args.preset)
    torch.manual_seed(args.seed)
    textsynch, generator = preset.build_textsynch().eval(), preset.build_generator().eval()
    seq = preset.seq
    video = torch.rand(1, seq.sync_num_frames, 3, preset.frame_size, preset.frame_size) * 2 - 1
    t5 = torch.randn(1, 7, preset.textsynch.text_dim)
    mask = torch.tensor([[True] * 5 + [False] * 2])
    clip_text = torch.randn(1, preset.generator.text_seq_len, preset.generator.text_dim)
    start = time.perf_counter()
    with torch.inference_mode():
        sync = textsynch(video, t5, mask)
        noise = torch.randn(1, seq.latent_seq_len, preset.generator.latent_dim)
        latent = generator.unnormalize(sample_latents(generator, noise, sync, clip_text, steps=25))
    print(f"video {tuple(video.shape)} -> sync features {tuple(sync.shape)} -> latents {tuple(latent.shape)}")
    print(f"done in {time.perf_counter() - start:.2f} s")
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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    check.add_parser(subparsers)
    _add_optional(subparsers, "preprocessing.inspect_cli")
    _add_optional(subparsers, "pipelines.precompute_cli")
    _add_presets(subparsers)
    _add_demo(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
