"""The generated training world (``pipelines.train_world``): a real tiny/embedded dataset folder whose
content is what the world says it is.

Most tests read the session-wide ``train_world`` fixture (conftest.py), the dataset the trainer's
tests share: 16 train and 8 val clips, seed 0, 4 samples per shard.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.train_world import (
    KINDS,
    MEDIA_ROOT,
    WorldSpec,
    acting,
    index_of,
    tone_band,
    world_clip,
    write_train_world,
)
from preprocessing.compact import decode_flac, decode_sync_mp4
from preprocessing.manifest import read_manifest
from preprocessing.prompt_store import PromptStore, read_empty_prompt
from preprocessing.shard_reader import iter_dataset
from preprocessing.shards import (
    done_and_missing,
    read_dataset_info,
    read_failures,
    read_input_failures,
    read_marker,
)
from selva.flow_matching import FlowMatching
from selva.mixing import MixConfig, mix_batch, mixing_generator
from selva.presets import TINY
from training.data_check import run_check
from training.dataset_stats import configure_generator, read_dataset_statistics
from training.loader import LoaderConfig, build_loader
from training.shard_order import open_source

SPEC = WorldSpec()
SEQ = TINY.seq  # 2 s: 50 frames, 32256 samples, 63 latent frames of 512 samples, 5 sync segments
HOP = 512  # the embedded codec's samples per latent frame (its STFT hop; window 1024)


def _samples(root: Path) -> list:
    return list(iter_dataset(root))


# -- the clips ---------------------------------------------------------------------------------------
def test_a_clip_is_a_function_of_seed_and_index_with_spaced_events():
    for index in range(12):
        clip = world_clip(index, SPEC)
        again = world_clip(index, SPEC)
        assert np.array_equal(clip.frames, again.frames) and np.array_equal(clip.audio, again.audio)
        assert clip.frames.shape == (50, 64, 64, 3) and clip.frames.dtype == np.uint8
        assert clip.audio.shape == (SEQ.num_audio_frames,) and clip.audio.dtype == np.float32
        assert np.abs(clip.audio).max() == pytest.approx(0.95)  # peak-normalised as decode_clip does
        assert SPEC.events[0] <= len(clip.onsets) <= SPEC.events[1]
        assert all(b - a >= SPEC.min_gap for a, b in itertools.pairwise(clip.onsets))
        assert clip.onsets[0] >= 1 and clip.onsets[-1] + SPEC.act_frames < 50  # every flash inside the clip
        assert clip.prompt == KINDS[clip.kind].prompt
    other = world_clip(0, WorldSpec(seed=1))
    assert other.onsets != world_clip(0, SPEC).onsets or other.centre != world_clip(0, SPEC).centre


def test_the_kinds_sound_in_bands_of_their_own():
    bands = [tone_band(kind.pitch_hz) for kind in KINDS]
    assert len(set(bands)) == len(KINDS) and all(b - a >= 3 for a, b in itertools.pairwise(bands))


# -- the folder: what precompute writes for tiny / embedded ------------------------------------------
def test_the_folder_is_a_finished_tiny_embedded_dataset(train_world):
    info = read_dataset_info(train_world)
    assert info.preset == "tiny" and info.seed == 0 and info.samples_per_shard == 4
    assert info.extra["encoders_family"] == "embedded" and info.extra["frame_size"] == 64
    assert info.encoders == {
        "t5": {"name": "minilm-l6-v2+fixed-projection", "dim": 64},
        "clip_text": {"name": "minilm-l6-v2+fixed-projection", "dim": 64},
        "codec": {"name": "log-mel", "latent_dim": 40, "sampling_rate": 16_000},
    }
    assert info.sequence_lengths == {"latent": 63, "clip_text": 77, "sync_frames": 50, "audio_samples": 32256}
    assert info.media_root == MEDIA_ROOT
    assert info.clips == {"train": 16, "val": 8} and info.shards == {"train": 4, "val": 2}
    assert info.samples == {"train": {"ok": 16, "failed": 0, "shards_done": 4},
                            "val": {"ok": 8, "failed": 0, "shards_done": 2}}  # fmt: skip
    assert info.input_rows == {"rows": 24, "clips": 24, "rejected": 0, "rejected_by_reason": {}}
    stats = info.latent_stats
    assert (stats["split"], stats["clips"], stats["shards"], stats["frames"]) == ("train", 16, 4, 16 * 63)
    assert info.prompt_store == {"folder": "text", "prompts": 4, "chunks": 1}
    assert read_empty_prompt(train_world, info.empty_prompt).clip_text.shape == (77, 64)

    done, missing = done_and_missing(train_world, verify_sha=True)
    assert missing == [] and len(done) == 6
    assert read_input_failures(train_world) == [] and all(read_failures(train_world, s) == [] for s in done)
    rows = read_manifest(train_world / "manifest.parquet")
    assert sorted(index_of(r.source_id) for r in rows if r.split == "train") == list(range(16))
    assert sorted(index_of(r.source_id) for r in rows if r.split == "val") == list(range(16, 24))


def test_samples_hold_the_arrays_precompute_stores(train_world):
    samples = _samples(train_world)
    assert len(samples) == 24
    for sample in samples:
        a = sample.arrays
        assert a["latent_mean"].shape == (63, 40) and a["latent_mean"].dtype == np.float32
        assert a["latent_std"].shape == (63, 40) and not a["latent_std"].any()  # the embedded codec is exact
        assert a["t5"].dtype == np.float16 and a["t5"].shape[1] == 64 and a["t5_mask"].all()
        assert a["t5_mask"].shape == (len(a["t5"]),) and a["t5_mask"].dtype == np.bool_
        assert a["clip_text"].shape == (77, 64) and a["clip_text"].dtype == np.float16
        # the stored features are the prompt store's bytes: the same path as precompute's shards
        t5, t5_mask, clip_text = PromptStore(train_world).get(sample.meta.text)
        assert np.array_equal(a["t5"], t5) and np.array_equal(a["clip_text"], clip_text)


def test_data_check_finds_it_consistent(train_world):
    source = open_source(train_world, split="train")
    report = run_check(source, LoaderConfig(batch_size=4, num_workers=0), ranks=2, epochs=2, mix=MixConfig(prob=0.5))
    assert report.problems() == [] and not report.errors
    assert report.dataset_samples == 16 and [e.unique for e in report.epochs] == [16, 16]
    assert report.mixed > 0 and report.no_distinct_partner == 0  # every batch holds other prompts to mix with


def test_statistics_configure_the_generator(train_world):
    stats = read_dataset_statistics(train_world)
    assert stats.family == "embedded" and stats.frames == 16 * 63
    assert stats.latent_mean.shape == (40,) and (stats.latent_std > 0.01).all()  # no constant band to divide by
    generator = TINY.build_generator()
    assert configure_generator(generator, train_world) == "dataset"
    assert torch.allclose(generator.latent_mean.double().flatten(), torch.from_numpy(stats.latent_mean).flatten())


def test_loader_batches_fit_the_tiny_models(train_world):
    torch.manual_seed(0)
    loader = build_loader(train_world, LoaderConfig(batch_size=4, num_workers=0), split="train")
    batch = next(iter(loader.epoch_batches()))
    assert batch["video_u8"].shape == (4, 50, 64, 64, 3)
    # prob 0: not mixed, only normalised (the one normalisation, as training does it)
    video, _ = mix_batch(batch["video_u8"], MixConfig(prob=0.0), mixing_generator(0, 0, 0))
    assert video.shape == (4, 50, 3, 64, 64) and -1.0 <= video.min() < video.max() <= 1.0

    textsynch, generator = TINY.build_textsynch().eval(), TINY.build_generator().eval()
    configure_generator(generator, train_world)
    with torch.no_grad():
        sync = textsynch(video, batch["t5"], batch["t5_mask"])
        assert sync.shape == (4, SEQ.sync_seq_len, 64)
        data = generator.normalize(batch["latent_mean"])
        assert data.shape == (4, 63, 40)
        fm, noise, t = FlowMatching(), torch.randn_like(data), FlowMatching.sample_t(4)
        flow = generator(fm.interpolate(noise, data, t), generator.empty_clip_sequence(4), sync, batch["clip_text"], t)
        assert flow.shape == (4, 63, 40)
        assert torch.isfinite(fm.loss(flow, noise, data)).all()


# -- the content -------------------------------------------------------------------------------------
def test_the_object_flashes_exactly_at_its_events(train_world):
    for sample in _samples(train_world)[:6]:
        clip = world_clip(index_of(sample.meta.source_id), SPEC)
        frames = decode_sync_mp4(sample.sync_mp4).astype(np.float64)
        assert frames.shape == (50, 64, 64, 3)
        assert np.abs(frames - clip.frames).mean() < 4  # H.264 at CRF 20
        (r, c), half = clip.centre, SPEC.size // 2 - 1
        core = frames[:, r - half : r + half, c - half : c + half].mean(axis=(1, 2))  # (T, 3)
        colour = np.asarray(KINDS[clip.kind].colour, np.float64)
        on = acting(clip.onsets, 50, SPEC)
        assert np.abs(core[on] - colour).max() < 25  # bright, in the kind's colour
        assert (core[~on].max(axis=1) < 0.45 * colour.max()).all()  # dim at rest
        # grown: the rim just outside the resting square lights up only while acting
        rim = frames[:, r - half - 3, c - 2 : c + 2].max(axis=(1, 2))
        assert (rim[on] > 150).all() and (rim[~on] < 60).all()


def test_the_latent_holds_the_kinds_tone_at_the_event_times(train_world):
    seen_kinds = set()
    for sample in _samples(train_world):
        clip = world_clip(index_of(sample.meta.source_id), SPEC)
        audio, rate = decode_flac(sample.audio_flac)
        assert rate == 16000 and np.abs(audio - clip.audio).max() <= 2**-15
        latent = sample.arrays["latent_mean"]  # (63, 40): frame k is centred on sample k * HOP
        band = tone_band(KINDS[clip.kind].pitch_hz)
        bursts = [(round(o / 25 * 16000), round(o / 25 * 16000) + round(SPEC.burst_s * 16000)) for o in clip.onsets]
        windows = [(k * HOP - HOP, k * HOP + HOP) for k in range(63)]
        quiet = [k for k, (lo, hi) in enumerate(windows) if all(hi < b0 or lo > b1 for b0, b1 in bursts)]
        others = [tone_band(kind.pitch_hz) for i, kind in enumerate(KINDS) if i != clip.kind]
        for b0, _b1 in bursts:
            k = b0 // HOP + 1  # the frame centred in the burst's first 32 ms: its window holds the head
            assert latent[k, band] > latent[quiet, band].max() + 1.0  # 2 decades of mel magnitude above rest
            assert latent[k, band] > latent[k, others].max() + 1.0  # and in this kind's band, not another's
        seen_kinds.add(clip.kind)
    assert seen_kinds == set(range(len(KINDS)))


def test_kinds_have_their_own_prompts_and_text_features(train_world):
    by_prompt = {s.meta.text: s.arrays for s in _samples(train_world)}
    assert sorted(by_prompt) == sorted(kind.prompt for kind in KINDS)
    pooled = {p: a["t5"].astype(np.float64).mean(axis=0) for p, a in by_prompt.items()}
    for a, b in itertools.combinations(by_prompt, 2):
        assert np.linalg.norm(pooled[a] - pooled[b]) > 0.05 * np.linalg.norm(pooled[a])
        assert not np.allclose(by_prompt[a]["clip_text"], by_prompt[b]["clip_text"], atol=1e-2)


def test_the_same_seed_writes_the_same_bytes(train_world, tmp_path):
    again = tmp_path / "again"
    keys = write_train_world(again, train=16, val=8, seed=0)
    assert {split: len(k) for split, k in keys.items()} == {"train": 16, "val": 8}

    def files(root: Path) -> list[Path]:
        # all but what records times and paths: the shard markers' timings, dataset.json's input path
        found = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
        return sorted(p for p in found if not (p.match("shards/*.json") or p.name == "dataset.json"))

    assert files(again) == files(train_world) and len(files(again)) == 22  # table, manifest, 6 tars, 7 text, 7 failures
    assert all((again / p).read_bytes() == (train_world / p).read_bytes() for p in files(again))
    for shard in done_and_missing(again)[0]:  # the markers too, but for their timings
        assert replace(read_marker(again, shard), timings={}) == replace(read_marker(train_world, shard), timings={})
    with pytest.raises(FileExistsError):
        write_train_world(again)
