"""The two-stage precompute's encoder stage alone on a GPU: clips/s per GPU and the GPU's busy share.

    PYTHONPATH=. python benchmarks/gpu_encoder_stage.py [--clips 1024] [--batch-sizes 1 8 32 128]

Needs only torch and numpy (it runs on a lent GPU machine without the project installed). What an
encoder actor does per shard, on pre-decoded inputs: the waveforms arrive in host memory (8 s, 16 kHz,
peak 0.95, as ``decode_clip`` leaves them), and ``ShardProcessor._latents``' loop runs: stack a batch,
copy it to the GPU, official 16 kHz mel + VAE encoder (``selva.audio``: official sizes, random
weights: the cost does not depend on the values), posterior mean and std back to host memory as
float32. Per batch size: clips/s (wall clock, after warm-up), the GPU's busy share (the stream's time
from each batch's copy in to its results out, by CUDA events, over the wall time: what the host's
stacking and the waits between batches leave idle) and the peak GPU memory. The
text encoders (FLAN-T5, CLIP) run once per distinct prompt per dataset, not per clip, and need
``transformers``: not timed here. Prints a table; record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selva.audio.codec import OfficialCodec  # noqa: E402
from selva.audio.mel import get_mel_converter  # noqa: E402
from selva.audio.vae import VAE  # noqa: E402

RATE, SECONDS, PEAK = 16_000, 8.0, 0.95
SAMPLES = 128_000  # 8 s at 16 kHz: a multiple of the codec's 512 samples per latent (250 latents)


def waveforms(clips: int, seed: int = 0) -> list[np.ndarray]:
    """Decoded-like clips: noise bursts over a tone, peak-normalised, float32 (N,)."""
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLES) / RATE
    out = []
    for i in range(clips):
        wave = np.sin(2 * np.pi * (200 + 10 * i) * t) * 0.3 + rng.normal(0, 0.1, SAMPLES)
        out.append((wave * PEAK / np.abs(wave).max()).astype(np.float32))
    return out


def encode_all(codec: OfficialCodec, audio: list[np.ndarray], batch: int, device: torch.device,
               spans: list | None = None) -> list:
    """ShardProcessor._latents' loop: consecutive batches, results back in host memory. ``spans`` collects a
    pair of CUDA events per batch, from before its copy to the GPU to after its results are back."""
    out = []
    for i in range(0, len(audio), batch):
        stacked = torch.from_numpy(np.stack(audio[i : i + batch]))
        if spans is not None:
            spans.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            spans[-1][0].record()
        mean, std = codec.encode(stacked.to(device))
        mean, std = mean.float().cpu().numpy(), std.float().cpu().numpy()
        if spans is not None:
            spans[-1][1].record()
        out.extend(zip(mean, std, strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = False  # as the actor runs: shapes vary only with the last batch
    torch.manual_seed(0)
    vae = VAE()
    vae.remove_weight_norm()  # as load_vae does after loading the weights
    codec = OfficialCodec(get_mel_converter("16k"), vae, None).to(device)
    params = sum(p.numel() for p in codec.parameters())
    audio = waveforms(args.clips)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | official 16 kHz mel + VAE encoder "
          f"({params / 1e6:.1f} M parameters, random weights) | {args.clips} clips of {SECONDS:g} s | "
          f"TF32 {'on' if args.tf32 else 'off'}")
    print(f"{'batch':>5} {'clips/s':>9} {'ms/clip':>8} {'GPU busy':>9} {'peak GiB':>9} {'decode CPUs to feed it':>23}")
    for batch in args.batch_sizes:
        encode_all(codec, audio[: max(batch, 8) * 2], batch, device)  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        spans: list = []
        started = time.perf_counter()
        encode_all(codec, audio, batch, device, spans)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
        gpu = sum(a.elapsed_time(b) for a, b in spans) / 1000
        rate = args.clips / wall
        peak = torch.cuda.max_memory_allocated() / 2**30
        # docs/precompute.md: a CPU core decodes ~1.5 clips/s (8 s clips, 720p H.264 + AAC)
        print(f"{batch:>5} {rate:>9.1f} {1000 / rate:>8.2f} {gpu / wall:>8.0%} {peak:>9.2f} "
              f"{rate / 1.5:>23.0f}")


if __name__ == "__main__":
    main()
