"""What training reads from a dataset besides samples: latent statistics, the empty prompt, the prompt store,
and the rule that decides whether the generator takes them (no Ray here: tests/test_precompute.py runs the job)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing.latent_stats import LatentMoments
from preprocessing.manifest import ClipRow, assign_shards, clip_key, manifest_hash, rows_by_shard, write_manifest
from preprocessing.prompt_store import (
    EmptyPrompt,
    PromptStore,
    empty_prompt_files,
    read_empty_prompt,
    remove_orphan_arrays,
    text_dir,
    write_chunk,
    write_empty_prompt,
)
from preprocessing.sample import Sample, SampleMeta
from preprocessing.shard_reader import iter_shard
from preprocessing.shard_writer import write_shard
from preprocessing.shards import DatasetInfo, ShardError, read_dataset_info, refresh_sample_counts, write_dataset_info
from selva.data_statistics import DataStatistics, apply_data_statistics
from selva.generator import Generator, GeneratorConfig
from training.dataset_stats import configure_generator, read_dataset_statistics

N, D, TEXT_LEN, TEXT_DIM = 12, 6, 7, 16
# channels far from zero mean and unit std, each with its own scale: a wrong formula shows
CHANNEL_MEAN = np.array([300.0, -2.0, 0.0, 5.0, -40.0, 1e-3])
CHANNEL_STD = np.array([0.5, 3.0, 1.0, 1e-2, 20.0, 7.0])


def _generator() -> Generator:
    cfg = GeneratorConfig(latent_dim=D, clip_dim=8, sync_dim=8, text_dim=TEXT_DIM, hidden_dim=16, num_heads=2,
                          depth=2, fused_depth=1, text_seq_len=TEXT_LEN, duration=2.0)
    return Generator(cfg)


def _dataset(root: Path, family: str = "embedded", train: int = 7, val: int = 3) -> Path:
    """A dataset folder written by the real shard writer: float32 latents with CHANNEL_MEAN/STD."""
    clips = [
        ClipRow(clip_key(f"c{i}", 0.0, 2.0), f"c{i}", f"c{i}.mp4", 0.0, 2.0, f"label {i % 3}",
                "train" if i < train else "val", i + 1)
        for i in range(train + val)
    ]
    rows = assign_shards(clips, seed=0, samples_per_shard=3)
    write_manifest(rows, root / "manifest.parquet")
    for shard, shard_rows in rows_by_shard(rows).items():
        samples = []
        for row in shard_rows:
            rng = np.random.default_rng(int(row.source_id[1:]))
            latent = CHANNEL_MEAN + CHANNEL_STD * rng.standard_normal((N, D))
            if row.split == "val":
                latent += 1000.0  # val must not leak into the train statistics
            arrays = {"latent_mean": latent.astype(np.float32), "latent_std": np.ones((N, D), np.float32),
                      "t5": np.zeros((2, 4), np.float32), "t5_mask": np.ones(2, np.bool_),
                      "clip_text": np.zeros((TEXT_LEN, TEXT_DIM), np.float32)}
            meta = SampleMeta(row.key, row.source_id, row.text, row.start, row.duration, row.split, row.shard)
            samples.append(Sample(meta, b"mp4", b"flac", arrays))
        write_shard(root, shard, shard_rows, samples)
    info = DatasetInfo(preset="test", media_root=str(root), encoders={}, sequence_lengths={}, seed=0,
                       samples_per_shard=3, manifest_hash=manifest_hash(rows), extra={"encoders_family": family})
    write_dataset_info(root, info)
    rng = np.random.default_rng(99)
    write_empty_prompt(root, EmptyPrompt(rng.standard_normal((2, 4)).astype(np.float32), np.ones(2, np.bool_),
                                         rng.standard_normal((TEXT_LEN, TEXT_DIM)).astype(np.float32)))
    info = refresh_sample_counts(root)
    info.empty_prompt = empty_prompt_files()
    write_dataset_info(root, info)
    return root


def _train_latents(root: Path) -> np.ndarray:
    """Every train sample's latent_mean read back from the tars, stacked (frames, D): the independent side."""
    shards = sorted(p.stem for p in (root / "shards").glob("train-*.tar"))
    return np.concatenate([s.arrays["latent_mean"] for shard in shards for s in iter_shard(root, shard)])


def test_moments_merge_equals_one_pass() -> None:
    rng = np.random.default_rng(0)
    x = (CHANNEL_MEAN + CHANNEL_STD * rng.standard_normal((1000, D))).astype(np.float32)
    parts = [x[:1], x[1:400], x[400:400], x[400:]]
    merged = LatentMoments.empty(D)
    for part in parts:
        merged = merged.merge(LatentMoments.of(part))
    ref = x.astype(np.float64)
    assert merged.count == 1000
    np.testing.assert_allclose(merged.mean, ref.mean(0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(merged.std, ref.std(0, ddof=1), rtol=1e-12)
    again = LatentMoments.from_json(json.loads(json.dumps(merged.to_json())))  # through dataset.json's JSON
    assert again.count == merged.count and np.array_equal(again.total, merged.total)
    assert np.array_equal(again.m2, merged.m2)


def test_train_statistics_equal_an_independent_computation(tmp_path) -> None:
    root = _dataset(tmp_path)
    stats = read_dataset_info(root).latent_stats
    latents = _train_latents(root).astype(np.float64)
    assert stats["split"] == "train" and stats["clips"] == 7 and stats["frames"] == len(latents) == 7 * N
    # float64 accumulation of float32 data: agreement to ~1e-12 relative, far below float32's 6e-8
    np.testing.assert_allclose(stats["mean"], latents.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["std"], latents.std(0, ddof=1), rtol=1e-12)
    # shard by shard, in any run: the markers hold the moments, so a recount gives the same bytes
    before = (root / "dataset.json").read_bytes()
    refresh_sample_counts(root)
    assert (root / "dataset.json").read_bytes() == before


def test_prompt_store_round_trip_and_resume(tmp_path) -> None:
    rng = np.random.default_rng(1)

    def feats(n: int):
        return (rng.standard_normal((n, 4)).astype(np.float16), np.ones(n, np.bool_),
                rng.standard_normal((TEXT_LEN, TEXT_DIM)).astype(np.float16))

    first = {"dog barking": feats(3), "rain": feats(1), "": feats(2)}
    write_chunk(tmp_path, first)
    store = PromptStore(tmp_path)
    assert store.prompts() == set(first) and store.get("cat") is None
    for prompt, arrays in first.items():
        got = store.get(prompt)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, arrays, strict=True))
    second = {"cat": feats(5)}
    write_chunk(tmp_path, second)
    assert np.array_equal(store.get("cat")[0], second["cat"][0])  # a later chunk is found by the same reader
    assert store.chunks == 2
    # a writer killed between arrays and index leaves orphans: removed, the finished chunks stay
    (text_dir(tmp_path) / "prompts-0000000000000000.t5.npy").write_bytes(b"partial")
    removed = remove_orphan_arrays(tmp_path)
    assert [p.name for p in removed] == ["prompts-0000000000000000.t5.npy"]
    assert PromptStore(tmp_path).prompts() == set(first) | set(second)


def test_embedded_dataset_sets_the_generator_and_normalises_its_latents(tmp_path) -> None:
    root = _dataset(tmp_path)
    # float64, so the check is exact: in float32, channel 3 (mean 5, std 0.01) alone errs by ~5e-5
    generator = _generator().double()
    assert configure_generator(generator, root) == "dataset"
    empty = read_empty_prompt(root)
    assert torch.equal(generator.empty_string_feat, torch.from_numpy(empty.clip_text).double())
    normalised = generator.normalize(torch.from_numpy(_train_latents(root)).double()[None])[0]
    torch.testing.assert_close(normalised.mean(0), torch.zeros(D, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(normalised.std(0), torch.ones(D, dtype=torch.float64), atol=1e-9, rtol=0)
    stats = read_dataset_statistics(root)
    assert stats.family == "embedded" and stats.frames == 7 * N


def test_official_dataset_keeps_the_checkpoint_values(tmp_path) -> None:
    root = _dataset(tmp_path, family="official")
    assert read_dataset_info(root).latent_stats  # the dataset has statistics, and they must not be used
    generator = _generator()
    with pytest.raises(ValueError, match="load its checkpoint first"):
        configure_generator(generator, root)  # placeholders: no checkpoint was loaded
    checkpoint = DataStatistics(torch.rand(D) + 1, torch.rand(D) + 0.5, torch.randn(TEXT_LEN, TEXT_DIM))
    apply_data_statistics(generator, checkpoint)  # stands in for load_generator
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    assert configure_generator(generator, root) == "checkpoint"
    assert all(torch.equal(v, before[k]) for k, v in generator.state_dict().items())


def test_mismatches_are_refused(tmp_path) -> None:
    generator = _generator()
    with pytest.raises(ValueError, match="channels"):
        apply_data_statistics(generator, DataStatistics(torch.zeros(D + 1), torch.ones(D + 1), torch.zeros(7, 16)))
    with pytest.raises(ValueError, match="> 0"):
        apply_data_statistics(generator, DataStatistics(torch.zeros(D), torch.zeros(D), torch.zeros(7, 16)))
    with pytest.raises(ValueError, match="empty-prompt"):
        apply_data_statistics(generator, DataStatistics(torch.zeros(D), torch.ones(D), torch.zeros(77, 16)))
    root = _dataset(tmp_path)
    info = read_dataset_info(root)
    info.latent_stats = {}
    write_dataset_info(root, info)
    with pytest.raises(ShardError, match="no latent statistics"):
        configure_generator(generator, root)
