"""Synthetic dataset folders in the real shard format, for loader tests, benchmarks and dry runs.

Writing a dataset folder is a pipeline's job, not the loader's. (``selva synth``, the synthetic world as
media files for the end-to-end proof, is ``pipelines.synth_world``.)

Writes ``dataset.json``, ``manifest.parquet``, shards, failures tables and markers with the real
writer (``preprocessing.shard_writer.write_shard``), so everything the loader reads is exactly what
the precompute job would write; only the content is made up. Frames are real H.264 (``encode_sync_mp4``)
so decoding costs what it costs on real shards; each clip's grey level encodes its index
(:func:`sample_level`) so a test can tell which clip a decoded (or mixed) frame came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.compact import encode_flac, encode_sync_mp4
from preprocessing.manifest import ClipRow, assign_shards, clip_key, manifest_hash, rows_by_shard, write_manifest
from preprocessing.sample import Sample, SampleMeta
from preprocessing.shard_writer import write_shard
from preprocessing.shards import DatasetInfo, write_dataset_info


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of the made-up samples (defaults: small, for tests; the tiny preset's 2 s at 25 fps)."""

    num_frames: int = 50
    frame_size: int = 64
    latent: tuple[int, int] = (10, 8)  # (N, D)
    t5_dim: int = 16
    t5_lengths: tuple[int, int] = (3, 12)  # prompt token counts drawn in [lo, hi]
    clip_text: tuple[int, int] = (7, 16)
    sync_feat: tuple[int, int] | None = None
    duration: float = 2.0


def sample_level(index: int) -> int:
    """Mean grey level of synthetic clip ``index`` (distinct for neighbouring indices)."""
    return 24 + (index * 53) % 208


def synthetic_frames(index: int, spec: SyntheticSpec) -> np.ndarray:
    """A clip with a flat level per clip and a small moving ramp, so H.264 has motion to code."""
    t = np.arange(spec.num_frames)[:, None, None, None]
    x = np.arange(spec.frame_size)[None, None, :, None]
    ramp = ((x + 2 * t) % 16).astype(np.int16) - 8
    level = np.full((spec.num_frames, spec.frame_size, spec.frame_size, 3), sample_level(index), np.int16)
    return np.clip(level + ramp, 0, 255).astype(np.uint8)


def write_synthetic_dataset(
    root: str | Path,
    num_samples: int,
    samples_per_shard: int,
    *,
    spec: SyntheticSpec = SyntheticSpec(),
    seed: int = 0,
    split: str = "train",
    videos: Sequence[bytes] | None = None,
) -> list[str]:
    """Write a dataset folder of ``num_samples`` samples; return the keys in index order.

    ``videos``: ready ``sync.mp4`` bytes to cycle through instead of encoding one clip per sample
    (benchmarks use real footage this way).
    """
    root = Path(root)
    clips = [
        ClipRow(
            clip_key(f"synth{i:06d}", 0.0, spec.duration),
            f"synth{i:06d}",
            f"synth{i:06d}.mp4",
            0.0,
            spec.duration,
            f"sound number {i}",
            split,
            i + 1,
        )
        for i in range(num_samples)
    ]
    rows = assign_shards(clips, seed=seed, samples_per_shard=samples_per_shard)
    write_manifest(rows, root / "manifest.parquet")
    shards = rows_by_shard(rows)
    info = DatasetInfo(
        preset="synthetic",
        media_root=str(root / "media"),
        encoders={"t5": {"name": "synthetic", "version": "1"}, "clip_text": {"name": "synthetic", "version": "1"}},
        sequence_lengths={"latent": spec.latent[0], "clip_text": spec.clip_text[0], "sync_frames": spec.num_frames},
        seed=seed,
        samples_per_shard=samples_per_shard,
        manifest_hash=manifest_hash(rows),
        clips={split: num_samples},
        shards={split: len(shards)},
    )
    write_dataset_info(root, info)
    index_of = {c.key: i for i, c in enumerate(clips)}
    audio = encode_flac(np.zeros(1600, np.float32), 16000)  # the loader never decodes it
    for shard, shard_rows in shards.items():
        samples = []
        for row in shard_rows:
            i = index_of[row.key]
            rng = np.random.default_rng([seed, i])
            length = int(rng.integers(spec.t5_lengths[0], spec.t5_lengths[1] + 1))
            arrays = {
                "latent_mean": rng.standard_normal(spec.latent).astype(np.float32),
                "latent_std": rng.random(spec.latent).astype(np.float32),
                "t5": rng.standard_normal((length, spec.t5_dim)).astype(np.float32),
                "t5_mask": np.ones(length, np.bool_),
                "clip_text": rng.standard_normal(spec.clip_text).astype(np.float32),
            }
            if spec.sync_feat is not None:
                arrays["sync_feat"] = rng.standard_normal(spec.sync_feat).astype(np.float32)
            video = videos[i % len(videos)] if videos else encode_sync_mp4(synthetic_frames(i, spec))
            meta = SampleMeta(row.key, row.source_id, row.text, row.start, row.duration, row.split, row.shard)
            samples.append(Sample(meta, video, audio, arrays))
        write_shard(root, shard, shard_rows, samples)
    return [c.key for c in clips]
