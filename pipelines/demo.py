"""``selva demo``: the embedded default end to end, with no downloads.

Today it runs the data half for real and the model half untrained:
1. precompute the two real VGGSound clips into shards (local Ray, embedded encoders, tiny preset);
2. read one sample back from its shard, mix it with the other clip (self-augmentation), encode the
   video with TextSynch and sample audio latents with the generator (25 Euler steps, CFG 4.5);
3. decode the latents with the embedded codec and write ``demo.wav`` next to the sample's own
   audio round trip (``reference.wav``).

The model weights are random until the training issue lands, so ``demo.wav`` is noise-like; the
point is that every stage runs. Training and evaluation join this demo as they are built. The stages
are library functions (``pipelines.precompute``, ``pipelines.shard_generation``); this verb parses
its arguments, calls them and reports.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_INPUT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real" / "videos.tsv"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="run the embedded-default demo end to end (no downloads)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", default=str(DEFAULT_INPUT), help="clip table (default: the two real clips)")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.precompute import PrecomputeConfig, run_precompute
    from pipelines.shard_generation import (
        decode_audio,
        generate_for_sample,
        mixed_frames,
        sample_reference_audio,
        untrained_models,
        write_wav,
    )
    from preprocessing.compact import decode_flac
    from preprocessing.shard_reader import iter_dataset
    from selva.mixing import MixConfig

    if not Path(args.input).is_file():
        # a bare clone: the demo's clips live in ../shared until the demo makes its own (synthetic) world
        print(f"error: the demo needs the clip table {args.input} (the two real VGGSound clips in "
              f"../shared/data/real beside this checkout); pass --input TABLE to use your own clips", file=sys.stderr)
        return 2
    out = Path(args.out)
    dataset = out / "dataset"
    started = time.perf_counter()
    print(f"[1/3] precompute {args.input} -> {dataset}")
    report = run_precompute(PrecomputeConfig(input=args.input, out=str(dataset), workers=2, progress=False))
    print(report.table())

    print("[2/3] read the shard back, mix, encode, sample")
    samples = list(iter_dataset(dataset))
    if not samples:
        print("no samples were written; see the failures above")
        return 1
    models = untrained_models("tiny", args.seed)
    batch = mixed_frames(samples, MixConfig(prob=1.0, seed=args.seed))
    target, sample = 0, samples[0]
    generated = generate_for_sample(models, batch["video"][target : target + 1], sample)
    info = batch["mix"]
    print(f"  target {sample.meta.source_id!r} ({sample.meta.text!r}); mixed={bool(info.mixed[target])}, "
          f"lambda={float(info.lam[target]):.2f}, target on the {'left' if info.target_left[target] else 'right'}")
    shapes = [tuple(x.shape[1:]) for x in (batch["video"], generated.sync, generated.latent)]
    print(f"  video {shapes[0]} -> sync {shapes[1]} -> latents {shapes[2]}")

    print("[3/3] decode audio")
    rate = models.encoders.codec.sampling_rate
    write_wav(out / "demo.wav", decode_audio(models, generated.latent), rate)
    write_wav(out / "reference.wav", sample_reference_audio(models, sample), rate)
    audio, _ = decode_flac(sample.audio_flac)
    print(f"  wrote {out / 'demo.wav'} (untrained model) and {out / 'reference.wav'} "
          f"(the clip's own latent through the codec; stored audio {len(audio) / rate:.2f} s)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
