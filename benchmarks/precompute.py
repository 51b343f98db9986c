"""Precompute throughput: both Ray designs against the same work in one plain process.

One-stage pool with 1 and 2 workers (each decodes and encodes), and the two-stage design (decode
tasks feeding encoder actors: 1 encoder actor, 1 and 2 decoders; on a GPU node the encoders would
hold the GPUs, here they are CPU encoders).

    .venv/bin/python benchmarks/precompute.py [--clips 64] [--samples-per-shard 8]

Input: ``--clips`` links to the two real VGGSound clips (10 s, 1280x720, AAC 44.1 kHz) in
``../shared/data/real``, so every clip is a real decode. Each configuration writes a fresh dataset
with the embedded encoders and the ``tiny`` preset. Steady-state rate = clips / time from "all
workers ready" to "last shard written"; Ray start-up and worker start-up (imports + encoder load)
are reported apart. The plain baseline is ``ShardProcessor`` over the same shards in this process.
Prints a table; record results in docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines.precompute import PrecomputeConfig, prepare_dataset, run_precompute  # noqa: E402
from pipelines.shard_processor import ShardProcessor  # noqa: E402
from preprocessing.manifest import rows_by_shard  # noqa: E402
from preprocessing.shards import read_dataset_info  # noqa: E402


def make_inputs(root: Path, clips: int) -> Path:
    real = Path(os.environ.get("SELVA_SHARED", REPO.parent / "shared")) / "data" / "real"
    sources = sorted(real.glob("*.mp4"))
    if not sources:
        sys.exit(f"no real clips in {real}")
    media = root / "media"
    media.mkdir(parents=True)
    lines = ["id\tlabel"]
    for i in range(clips):
        src = sources[i % len(sources)]
        (media / f"clip{i:04d}.mp4").symlink_to(src)
        # a few distinct prompts, as in real data where labels repeat
        lines.append(f"clip{i:04d}\tsound number {i % 8}")
    table = root / "clips.tsv"
    table.write_text("\n".join(lines) + "\n")
    return table


def plain(cfg: PrecomputeConfig) -> tuple[float, float]:
    """(start-up seconds, steady-state seconds) of the same work without Ray."""
    rows, _ = prepare_dataset(cfg)
    media_root = read_dataset_info(cfg.out).media_root
    started = time.perf_counter()
    processor = ShardProcessor(cfg.worker_settings())
    startup = time.perf_counter() - started
    started = time.perf_counter()
    for shard, shard_rows in rows_by_shard(rows).items():
        processor.process(cfg.out, shard, shard_rows, media_root)
    return startup, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=8)
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(1)  # the baseline uses one core, like one Ray worker (OMP_NUM_THREADS=1)
    root = Path(tempfile.mkdtemp(prefix="selva-bench-precompute-"))
    try:
        table = make_inputs(root, args.clips)

        def config(name: str, workers: int, encoders: int = 0) -> PrecomputeConfig:
            return PrecomputeConfig(input=str(table), out=str(root / name), media_root=str(root / "media"),
                                    workers=workers, encoder_actors=encoders, samples_per_shard=args.samples_per_shard,
                                    progress=False)  # fmt: skip

        rows = [("plain process (baseline)", *plain(config("plain", 1)), 0.0)]
        for name, workers, encoders in (("one-stage, 1 worker", 1, 0), ("one-stage, 2 workers", 2, 0),
                                        ("two-stage, 1 dec + 1 enc", 1, 1), ("two-stage, 2 dec + 1 enc", 2, 1)):
            report = run_precompute(config(name.replace(" ", "").replace(",", "-"), workers, encoders))
            assert report.ok == args.clips, report.table()
            rows.append((name, report.worker_start_seconds, report.run_seconds, report.ray_start_seconds))
            ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = args.clips / rows[0][2]
    print(f"{args.clips} clips (real 10 s 720p sources), tiny preset, embedded encoders, "
          f"{args.samples_per_shard} clips/shard, {os.cpu_count()} CPUs")
    print(f"{'configuration':<26} {'ray start s':>11} {'worker start s':>14} {'steady clips/s':>14} {'vs plain':>8}")
    for name, startup, steady, ray_start in rows:
        rate = args.clips / steady
        print(f"{name:<26} {ray_start:>11.1f} {startup:>14.1f} {rate:>14.2f} {rate / base:>8.2f}")


if __name__ == "__main__":
    main()
