"""``selva demo``: the embedded default end to end, with no downloads.

Today it runs the data half for real and the model half untrained:
1. precompute the two real VGGSound clips into shards (local Ray, embedded encoders, tiny preset);
2. read one sample back from its shard, mix it with the other clip (self-augmentation), encode the
   video with TextSynch and sample audio latents with the generator (25 Euler steps, CFG 4.5);
3. decode the latents with the embedded codec and write ``demo.wav`` next to the sample's own
   audio round trip (``reference.wav``).

The model weights are random until the training issue lands, so ``demo.wav`` is noise-like; the
point is that every stage runs. Training and evaluation join this demo as they are built.
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


def _write_wav(path: Path, wave, sample_rate: int) -> None:
    import wave as wavlib

    import numpy as np

    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
    tmp = path.with_name(path.name + ".tmp")
    with wavlib.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from pipelines.precompute import PrecomputeConfig, run_precompute
    from preprocessing.compact import decode_flac, decode_sync_mp4
    from preprocessing.shard_reader import iter_shard
    from preprocessing.shards import done_and_missing
    from selva.encoders import build_encoders
    from selva.mixing import MixConfig, apply_to_batch
    from selva.presets import get_preset
    from selva.sampling import sample_latents

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
    samples = [s for shard in done_and_missing(dataset)[0] for s in iter_shard(dataset, shard)]
    if not samples:
        print("no samples were written; see the failures above")
        return 1
    preset = get_preset("tiny")
    torch.manual_seed(args.seed)
    encoders = build_encoders("embedded", preset)
    textsynch, generator = preset.build_textsynch().eval(), preset.build_generator().eval()
    frames = torch.from_numpy(np.stack([decode_sync_mp4(s.sync_mp4) for s in samples]))
    batch = {"video_u8": frames, "text": [s.meta.text for s in samples]}
    mix = MixConfig(prob=1.0, seed=args.seed)
    batch = apply_to_batch(batch, mix, mix.generator(step=0, rank=0))
    target = 0
    text = samples[target].meta.text
    with torch.inference_mode():
        t5 = torch.from_numpy(samples[target].arrays["t5"].astype(np.float32))[None]
        t5_mask = torch.from_numpy(samples[target].arrays["t5_mask"])[None]
        clip_text = torch.from_numpy(samples[target].arrays["clip_text"].astype(np.float32))[None]
        sync = textsynch(batch["video"][target : target + 1], t5, t5_mask)
        noise = torch.randn(1, preset.seq.latent_seq_len, preset.generator.latent_dim)
        latent = generator.unnormalize(sample_latents(generator, noise, sync, clip_text, steps=25))
        wave = encoders.codec.decode(latent)[0].numpy()
        reference = encoders.codec.decode(torch.from_numpy(samples[target].arrays["latent_mean"])[None])[0].numpy()
    info = batch["mix"]
    print(f"  target {samples[target].meta.source_id!r} ({text!r}); mixed={bool(info.mixed[target])}, "
          f"lambda={float(info.lam[target]):.2f}, target on the {'left' if info.target_left[target] else 'right'}")
    shapes = [tuple(x.shape[1:]) for x in (batch["video"], sync, latent)]
    print(f"  video {shapes[0]} -> sync {shapes[1]} -> latents {shapes[2]}")

    print("[3/3] decode audio")
    rate = encoders.codec.sampling_rate
    _write_wav(out / "demo.wav", wave, rate)
    _write_wav(out / "reference.wav", reference, rate)
    audio, _ = decode_flac(samples[target].audio_flac)
    print(f"  wrote {out / 'demo.wav'} (untrained model) and {out / 'reference.wav'} "
          f"(the clip's own latent through the codec; stored audio {len(audio) / rate:.2f} s)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
