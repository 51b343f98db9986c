"""Training loader speed and memory: ``training.loader`` (with mixing) vs plain ``decode_sync_mp4``.

For each frame size (``tiny``: 64 px, 2 s = 50 frames; ``small_16k``: 224 px, 8 s = 200 frames) the
script writes a dataset folder with the real shard writer, its ``sync.mp4`` members cut from the real
clips in ``../shared/data/real`` (cycled; every sample still goes through a full decode), and its
arrays at the preset's sizes (official FLAN-T5/CLIP-H/VAE sizes for ``small_16k``). Then, on the same
dataset:

* baseline: ``decode_sync_mp4`` over every sample's bytes in a loop, in this process (bytes read
  beforehand, so the baseline is decoding only);
* the loader with 1 and 2 DataLoader workers, mixing on (p 0.5, on the CPU in the main process),
  one full epoch including worker start-up, shuffle-buffer fill and collation.

The runs alternate (baseline, then each loader setting, ``--repeats`` rounds) and the best of each
counts, so a busy spell on a shared machine hits all alike. Ratios, "higher is better for the
loader": wall-clock samples/s per worker over the baseline's (target >= 0.8), and the baseline's
CPU seconds per sample over the loader's (all processes: this one, which mixes, and the reaped
workers), which is steadier where other jobs share the cores. Memory: peak RSS summed over this
process and its workers (shared pages counted once per process, an upper bound) and peak PSS
(shared pages split), for the 2-worker loader on the dataset and on one with 4x the shards
(target: flat).

    .venv/bin/python benchmarks/loader.py            # both sizes
    .venv/bin/python benchmarks/loader.py --sizes tiny --shards 4 --per-shard 16
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from pipelines.synth import SyntheticSpec, write_synthetic_dataset  # noqa: E402
from preprocessing.compact import decode_sync_mp4, encode_sync_mp4  # noqa: E402
from preprocessing.media import decode_clip  # noqa: E402
from preprocessing.shard_reader import iter_shard  # noqa: E402
from preprocessing.shards import done_and_missing  # noqa: E402
from selva.mixing import MixConfig  # noqa: E402
from training.data_check import PeakRSS  # noqa: E402
from training.loader import LoaderConfig, build_loader  # noqa: E402

CLIPS = REPO_ROOT.parent / "shared" / "data" / "real"
SIZES = {
    # name: (spec, batch, starts into the 10 s clips)
    "tiny": (SyntheticSpec(50, 64, (63, 40), 64, (5, 20), (77, 64), None, 2.0), 8, (0.0, 2.5, 5.0, 7.5)),
    "small_16k": (SyntheticSpec(200, 224, (250, 20), 768, (5, 20), (77, 1024), None, 8.0), 2, (0.0, 2.0)),
}


def real_videos(spec: SyntheticSpec, starts: tuple[float, ...]) -> list[bytes]:
    videos = []
    for clip in sorted(CLIPS.glob("*.mp4")):
        for start in starts:
            decoded = decode_clip(clip, duration=spec.duration, frame_size=spec.frame_size, start=start)
            videos.append(encode_sync_mp4(decoded.frames))
    return videos


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (DataLoader workers are joined at epoch end)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def plain_decode(data: list[bytes]) -> int:
    for item in data:
        decode_sync_mp4(item)
    return len(data)


def loader_epoch(root: Path, workers: int, batch: int, mix: bool) -> int:
    cfg = LoaderConfig(batch_size=batch, num_workers=workers, shuffle_buffer=64)
    loader = build_loader(root, cfg, mix=MixConfig(prob=0.5, seed=0) if mix else None)
    samples = 0
    for batch_ in loader.epoch_batches():
        samples += len(batch_["key"])
        del batch_
    return samples


def timed(run: Callable[[], int]) -> tuple[float, float]:
    """(samples/s, CPU s/sample over all processes) of one run."""
    gc.collect()
    began, cpu = time.perf_counter(), cpu_seconds()
    samples = run()
    return samples / (time.perf_counter() - began), (cpu_seconds() - cpu) / samples


def loader_memory(root: Path, workers: int, batch: int) -> tuple[int, int]:
    """Peak RSS and PSS (this process + workers) over one epoch with mixing; measured apart from the
    speed runs, since sampling /proc costs CPU."""
    gc.collect()
    with PeakRSS(interval_s=0.1) as memory:
        loader_epoch(root, workers, batch, mix=True)
    return memory.peak, memory.peak_pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--shards", type=int, default=4, help="shards of the 1x dataset")
    parser.add_argument("--per-shard", type=int, default=0, help="samples per shard (default 16 tiny, 6 small_16k)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    args = parser.parse_args()
    torch.set_num_threads(1)  # mixing in the main process must not steal the workers' cores
    mib = 2**20
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    rows, memory_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            spec, batch, starts = SIZES[name]
            per_shard = args.per_shard or (16 if name == "tiny" else 6)
            videos = real_videos(spec, starts)
            roots = {}
            for scale in (1, 4):
                roots[scale] = Path(tmp) / f"{name}-{scale}x"
                n = args.shards * scale * per_shard
                write_synthetic_dataset(roots[scale], n, per_shard, spec=spec, videos=videos)
            data = [s.sync_mp4 for shard in done_and_missing(roots[1])[0] for s in iter_shard(roots[1], shard)]
            count = len(data)
            baseline = "decode_sync_mp4 loop (baseline)"
            runs: dict[str, tuple[int, Callable[[], int]]] = {baseline: (1, functools.partial(plain_decode, data))}
            for mix in (True, False):
                for workers in (1, 2):
                    what = f"loader, {workers} worker(s), batch {batch}, mixing {'on' if mix else 'off'}"
                    runs[what] = (workers, functools.partial(loader_epoch, roots[1], workers, batch, mix))
            best = {what: (0.0, float("inf")) for what in runs}
            for _ in range(args.repeats):  # interleaved, so a busy spell on the shared VM hits all alike
                for what, (_, run) in runs.items():
                    rate, cpu = timed(run)
                    best[what] = (max(best[what][0], rate), min(best[what][1], cpu))
            base_rate, base_cpu = best[baseline]
            for what, (rate, cpu) in best.items():
                per_worker = rate / runs[what][0]
                rows.append((name, what, count, rate, per_worker, cpu, per_worker / base_rate, base_cpu / cpu))
            for scale in (1, 4):
                rss, pss = loader_memory(roots[scale], 2, batch)
                memory_rows.append((name, scale, count * scale, rss, pss))
    print(
        "\n| size | pipeline | samples | samples/s | per worker | CPU ms/sample | ratio (wall, per worker) |"
        " ratio (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, what, count, rate, per_worker, cpu, ratio, cpu_ratio in rows:
        print(
            f"| {name} | {what} | {count} | {rate:.1f} | {per_worker:.1f} | {1000 * cpu:.1f} | {ratio:.2f} | "
            f"{cpu_ratio:.2f} |"
        )
    print("\n| size | shards | samples | peak RSS MiB | peak PSS MiB |")
    print("|---|---|---|---|---|")
    for name, scale, count, rss, pss in memory_rows:
        print(f"| {name} | {scale}x ({args.shards * scale}) | {count} | {rss / mib:.0f} | {pss / mib:.0f} |")


if __name__ == "__main__":
    main()
