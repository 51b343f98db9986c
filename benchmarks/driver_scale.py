"""Driver-side scale of precompute: a million-row input table before the first shard, and after the last.

    .venv/bin/python benchmarks/driver_scale.py [--rows 1000000] [--samples-per-shard 1000]

What the driver does alone, without Ray, measured step by step (wall seconds, and the process's peak
resident memory after the step, which only grows):

1. the manifest step (``prepare_dataset``): read and judge the table, keys, duplicates, shard
   assignment, ``manifest.parquet`` + ``dataset.json`` (media files are missing here: each row's
   existence check is still made, and counted as a later ``missing_file``, as on a real run);
2. the resume check of a rerun: the manifest read back and every shard's done-marker looked at
   (``shards_to_run``), with no shard done;
3. the same with every shard done (markers, tars and failure files faked with real moments);
4. the statistics reduction after the last shard (``refresh_sample_counts``: counts and the train
   split's latent statistics merged over every marker).

Prints a table; record results in docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines.precompute import PrecomputeConfig, prepare_dataset, shards_to_run  # noqa: E402
from preprocessing.latent_stats import LatentMoments  # noqa: E402
from preprocessing.manifest import rows_by_shard  # noqa: E402
from preprocessing.shards import (  # noqa: E402
    ShardMarker,
    refresh_sample_counts,
    shard_marker_path,
    shard_tar_path,
    split_of,
    write_failures,
    write_json_atomic,
)  # fmt: skip


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def fake_done(out: Path, by_shard: dict, dim: int = 40) -> None:
    """Every shard marked done: an empty tar of the marker's size, an empty failures file, a marker with
    the keys and real latent moments (what refresh_sample_counts merges)."""
    rng = np.random.default_rng(0)
    for shard, rows in by_shard.items():
        tar = shard_tar_path(out, shard)
        tar.parent.mkdir(parents=True, exist_ok=True)
        tar.write_bytes(b"")
        write_failures(out, shard, [])
        moments = LatentMoments.of(rng.normal(size=(8, dim)))
        marker = ShardMarker(shard, split_of(shard), 0, "0" * 64, len(rows), len(rows), 0, {},
                             [r.key for r in rows], {}, latent_moments=moments.to_json())  # fmt: skip
        write_json_atomic(shard_marker_path(out, shard), marker.to_json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="selva-bench-driver-"))
    steps = []

    def step(name: str, fn):
        started = time.perf_counter()
        value = fn()
        steps.append((name, time.perf_counter() - started, peak_mb()))
        return value

    try:
        (root / "media").mkdir()
        table = root / "clips.tsv"
        with open(table, "w", encoding="utf-8") as handle:  # VGGSound-like: ids and 310 repeating labels
            handle.write("id\tlabel\n")
            for i in range(args.rows):
                handle.write(f"vid{i:08d}_{i % 997:06d}\tsound class number {i % 310}\n")
        base = peak_mb()
        cfg = PrecomputeConfig(str(table), str(root / "dataset"), media_root=str(root / "media"),
                               samples_per_shard=args.samples_per_shard, max_failed_fraction=1.0, progress=False)
        rows, _ = step("manifest step (prepare_dataset)", lambda: prepare_dataset(cfg))
        by_shard = rows_by_shard(rows)
        todo, _ = step("rerun: manifest read back + resume check",
                       lambda: prepare_dataset(cfg) and shards_to_run(cfg, rows))
        assert len(todo) == len(by_shard)
        fake_done(Path(cfg.out), by_shard)
        todo, done = step("resume check, every shard done", lambda: shards_to_run(cfg, rows))
        assert not todo and len(done) == len(by_shard)
        info = step("statistics reduction (refresh_sample_counts)", lambda: refresh_sample_counts(cfg.out))
        assert sum(v["ok"] for v in info.samples.values()) == args.rows
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.rows} input rows, {len(by_shard)} shards of {args.samples_per_shard}; "
          f"process peak before the first step {base:.0f} MB")
    print(f"{'step':<48} {'seconds':>8} {'peak RSS MB':>12}")
    for name, seconds, peak in steps:
        print(f"{name:<48} {seconds:>8.1f} {peak:>12.0f}")


if __name__ == "__main__":
    main()
