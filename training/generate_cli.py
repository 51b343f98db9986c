"""``selva generate``: one video and prompt, or a whole list (``--manifest``), to sound tracks.

docs/generate-and-evaluate.md has the walk-through; training/generate.py the rules (durations, names,
the mp4's video copy or re-encode, the negative prompt).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="generate the prompted sound for a video (or a list: --manifest)",
        description="Generate the sound a text prompt selects from a video: NAME.flac (mono at the model's "
        "rate, exactly duration x 16000 or x 44100 samples), NAME.mp4 (the input's span with the new track) "
        "and NAME.png (spectrogram). "
        "--manifest TABLE|BENCHMARK_DIR does a whole list in batches, skips finished items, records failures "
        "in OUT/failures/ and splits the list over torchrun ranks.",
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="one of our exports (a training run's final/) or an official weights folder (docs/weights.md)")
    p.add_argument("--weights", type=Path, help="the official encoders' folder, for an export trained on them")
    p.add_argument("--preset", help="which released model an official weights folder holds: small_16k (default), "
                                    "small_44k, medium_44k or large_44k (an export knows its own)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    one = p.add_argument_group("one video")
    one.add_argument("--video", type=Path, help="the video file (its audio, if any, is not used)")
    one.add_argument("--prompt", help="the sound to generate, e.g. 'a dog barking'")
    one.add_argument("--negative-prompt", help="replaces the empty text of the unconditional CFG branch "
                     "(the official examples give the other object's label)")
    one.add_argument("--name", help="output file stem (default: <video id>-<prompt slug>-<hash>)")
    one.add_argument("--start", type=float, default=0.0, help="span start in seconds (default 0)")
    one.add_argument("--duration", type=float,
                     help="span length in seconds, a multiple of 0.04 and >= 0.64 (default: the preset's clip length)")
    many = p.add_argument_group("a list")
    many.add_argument("--manifest", type=Path, help="a clip table (id, label/caption/text, optional path, start, "
                      "duration, negative) or a benchmark folder (selva benchmark build)")
    many.add_argument("--text-column", help="the prompt column when the table has several (caption, label, text)")
    many.add_argument("--batch-size", type=int, default=8, help="clips per sampler call (default 8)")
    many.add_argument("--ray-workers", type=int, default=0,
                      help="split the list over N Ray workers (RAY_ADDRESS: that cluster; else a local Ray) "
                      "instead of torchrun ranks")
    many.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray worker (default 0: CPU)")
    p.add_argument("--steps", type=int, default=25, help="Euler steps (default 25, as the official inference)")
    p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance strength (default 4.5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (batch mode: each item's seed derives from it)")
    p.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from preprocessing.errors import Rejected
    from training.generate import (
        GenerationError,
        GenerationRequest,
        check_name,
        default_name,
        generate,
        load_model,
        write_outputs,
    )

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per text tower is noise here
    if (args.manifest is None) == (args.video is None):
        print("error: give either --video FILE --prompt TEXT or --manifest TABLE", file=sys.stderr)
        return 2
    if args.video is not None and args.prompt is None:
        print("error: --video needs --prompt TEXT (the sound to generate)", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file; give a folder (it is created if missing)", file=sys.stderr)
        return 2
    if args.manifest is not None:
        single = [flag for flag, value in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                                           ("--name", args.name), ("--start", args.start or None),
                                           ("--duration", args.duration)) if value is not None]
        if single:  # silently ignoring them would generate something else than asked
            print(f"error: {', '.join(single)} belong to one --video; with --manifest each row gives its own "
                  "(columns label/caption/text, negative, start, duration; outputs are named by id)", file=sys.stderr)
            return 2
    try:
        if args.name is not None:
            check_name(args.name)
    except GenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_model(args.checkpoint, weights=args.weights, device=device, preset=args.preset)
    except GenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.manifest is not None:
        return _run_manifest(args, model)
    name = default_name(args.video, " ".join(args.prompt.split()), args.start, args.duration)
    request = GenerationRequest(args.video, args.prompt, args.negative_prompt, args.start, args.duration, args.steps,
                                args.cfg, args.seed)
    started = time.perf_counter()
    try:
        result = generate(model, request)
        written = write_outputs(result, request, args.out, args.name or name)
    except (GenerationError, Rejected) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    video = "copied" if written.video_copied else f"re-encoded ({written.reencode_reason})"
    print(f"wrote {written.flac}, {written.mp4} (video {video}) and {written.png} "
          f"in {time.perf_counter() - started:.1f} s")
    if written.clipped_samples:
        print(f"note: {written.clipped_samples} samples beyond [-1, 1] were clipped in the files")
    return 0


def _run_manifest(args: argparse.Namespace, model: Any) -> int:
    from tqdm import tqdm

    from training.generate_batch import (
        check_settings,
        items_from_benchmark,
        items_from_table,
        record_rejected_rows,
        run_items,
    )

    rank, world = _rank_and_world()
    if args.manifest.is_dir():
        items, rejected = items_from_benchmark(args.manifest), []
    else:
        items, rejected = items_from_table(args.manifest, text_column=args.text_column)
    check_settings(args.out, {"checkpoint": str(args.checkpoint.resolve()), "steps": args.steps, "cfg": args.cfg,
                              "seed": args.seed, "weights": str(args.weights.resolve()) if args.weights else None})
    if rank == 0:  # every rank reads the same table: one of them records and prints its rejected rows
        record_rejected_rows(args.out, rejected)
        for line in rejected:
            print(f"rejected: {line}", file=sys.stderr)
    if args.ray_workers > 0:
        from pipelines.generate_ray import run_on_ray

        merged = run_on_ray(args.checkpoint, args.weights, items, args.out, workers=args.ray_workers,
                            preset=args.preset,
                            steps=args.steps, cfg=args.cfg, seed=args.seed, batch_size=max(1, args.batch_size),
                            gpus_per_worker=args.gpus_per_worker)
        for line in merged["failures"]:
            print(f"failed: {line}", file=sys.stderr)
        failed = sum(merged["failed"].values())
        print(f"{args.ray_workers} Ray workers: generated {merged['generated']}, already done "
              f"{merged['done_before']}, failed {failed}" + (f", rejected rows {len(rejected)}" if rejected else ""))
        return 1 if failed or rejected else 0
    share = len(items[rank::world])
    with tqdm(total=share, desc=f"generate rank {rank}/{world}", unit="clip", disable=None) as bar:
        report = run_items(model, items, args.out, steps=args.steps, cfg=args.cfg, seed=args.seed,
                           batch_size=max(1, args.batch_size), rank=rank, world_size=world, on_item=bar.update)
    report.rejected_rows = rejected
    for line in report.failures:
        print(f"failed: {line}", file=sys.stderr)
    print(f"rank {rank}/{world}: {report.table()}" if world > 1 else report.table())
    return 1 if report.failed or rejected else 0


def _rank_and_world() -> tuple[int, int]:
    """``RANK``/``WORLD_SIZE`` as torchrun sets them; GenerationError when they make no split."""
    from training.generate import GenerationError

    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise GenerationError(f"RANK/WORLD_SIZE must be integers ({err})") from None
    if world < 1 or not 0 <= rank < world:
        raise GenerationError(f"RANK={rank} WORLD_SIZE={world}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    return rank, world
