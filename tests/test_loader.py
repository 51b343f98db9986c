"""The streaming training loader: coverage, equal steps, batch contract, error skipping, exact resume.

Datasets are written by the real shard writer (pipelines/synth.py) with real H.264 frames,
22 samples in shards of 5, 5, 5, 5 and 2 (an uneven shard count and an uneven last shard).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_server import FaultServer
from tracking_servers import silent_server

from pipelines.synth import sample_level, write_synthetic_dataset
from preprocessing.compact import decode_sync_mp4
from preprocessing.shard_reader import iter_shard
from preprocessing.shards import ShardError, done_and_missing, shard_marker_path, shard_tar_path
from selva.mixing import MixConfig, apply_to_batch, mixing_generator
from training.loader import LoaderConfig, TrainLoader, build_loader
from training.sample_stream import shuffled
from training.shard_order import (
    Segment,
    ShardEntry,
    ShardSource,
    batches_per_rank,
    open_source,
    plan_rank,
    seeded_rng,
    source_from_urls,
)
from training.tar_stream import RETRY_KIND, ErrorLog, ShardReadError, iter_segment

NUM, PER_SHARD = 22, 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("loader") / "data"
    keys = write_synthetic_dataset(root, NUM, PER_SHARD)
    return root, keys


def copy_dataset(dataset: tuple[Path, list[str]], to: Path) -> Path:
    shutil.copytree(dataset[0], to)
    return to


def shard_members(root: Path) -> list[tuple[Path, tarfile.TarInfo]]:
    out = []
    for shard in done_and_missing(root)[0]:
        with tarfile.open(shard_tar_path(root, shard)) as tar:
            out += [(shard_tar_path(root, shard), info) for info in tar.getmembers()]
    return out


def patch_member(root: Path, name: str, data: bytes) -> None:
    """Overwrite member ``name``'s bytes in place (same size, so the shard stays 'done')."""
    path, info = next((p, i) for p, i in shard_members(root) if i.name == name)
    assert len(data) == info.size
    with open(path, "r+b") as handle:
        handle.seek(info.offset_data)
        handle.write(data)


def corrupt(root: Path, keys: list[str]) -> tuple[str, str]:
    """Garbage sync.mp4 for one sample, a .npy header claiming more data than stored for another."""
    bad_mp4, bad_npy = keys[3], keys[11]
    info = next(i for _, i in shard_members(root) if i.name == f"{bad_mp4}.sync.mp4")
    patch_member(root, info.name, (b"not an mp4 " * info.size)[: info.size])
    path, info = next((p, i) for p, i in shard_members(root) if i.name == f"{bad_npy}.t5.npy")
    with tarfile.open(path) as tar:
        npy = tar.extractfile(info).read()
    start = npy.index(b"'shape': (") + len(b"'shape': (")
    digits = npy[start : npy.index(b",", start)]
    patch_member(
        root, info.name, npy[:start] + str(int(digits) + 1).rjust(len(digits)).encode() + npy[start + len(digits) :]
    )
    return bad_mp4, bad_npy


def epoch_keys(loader: TrainLoader) -> list[list[str]]:
    return [batch["key"] for batch in loader.epoch_batches()]


def flat(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_rank_sees_every_sample_once_per_epoch(dataset, workers):
    root, keys = dataset
    loader = build_loader(root, LoaderConfig(batch_size=2, num_workers=workers, shuffle_buffer=4))
    assert loader.batches_per_epoch == 11
    first, second = epoch_keys(loader), epoch_keys(loader)
    for batches in (first, second):
        assert len(batches) == 11 and all(len(b) == 2 for b in batches)
        assert sorted(flat(batches)) == sorted(keys)  # exactly once each
    assert flat(first) != flat(second)  # a new epoch, a new order
    assert loader.epoch == 2 and loader.error_counts == {}
    again = build_loader(root, LoaderConfig(batch_size=2, num_workers=workers, shuffle_buffer=4))
    assert epoch_keys(again) == first  # deterministic


@pytest.mark.parametrize("batch", [2, 3, 4])
def test_ranks_get_equal_steps_and_cover_the_epoch(dataset, batch):
    """5 shards over 2 ranks x 2 workers: equal batch counts; every sample at least once; the repeats
    are exactly the spare slots of the ceil rule."""
    root, keys = dataset
    cfg = LoaderConfig(batch_size=batch, num_workers=2, shuffle_buffer=3, seed=7)
    source = open_source(root)
    per_rank = [epoch_keys(TrainLoader(source, cfg, rank=r, world_size=2)) for r in range(2)]
    expected = batches_per_rank(NUM, 2, batch)
    assert [len(b) for b in per_rank] == [expected, expected]
    seen = Counter(k for batches in per_rank for k in flat(batches))
    assert set(seen) == set(keys)
    assert sum(seen.values()) - NUM == expected * 2 * batch - NUM < 2 * batch
    # ranks read disjoint shares: a repeat is a re-draw from the rank's own share
    own = [set(flat(b)) for b in per_rank]
    assert not own[0] & own[1]


def test_plan_partitions_every_epoch():
    """Pure check of the plan over many layouts: shares partition the samples, quotas fit the shares."""
    counts = [5, 5, 5, 5, 2, 7, 1]
    source = ShardSource(tuple(ShardEntry(f"s{i}.tar", n) for i, n in enumerate(counts)), sum(counts), True)
    for world in (1, 2, 3, 5, 40):
        for workers in (1, 2, 3):
            for batch in (1, 2, 4):
                b = batches_per_rank(sum(counts), world, batch)
                taken = Counter()
                for rank in range(world):
                    plans = plan_rank(
                        source, seed=1, epoch=3, rank=rank, world_size=world, num_workers=workers, batch_size=batch
                    )
                    assert sum(p.batches for p in plans) == b
                    for p in plans:
                        share = [(s.shard, i) for s in p.segments for i in range(s.start, s.stop)]
                        assert len(share) <= p.batches * batch and p.redraw
                        taken.update(share)
                assert sorted(taken) == sorted((s, i) for s, n in enumerate(counts) for i in range(n))
                assert set(taken.values()) == {1}


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(50))
    a = list(shuffled(items, 8, seeded_rng("t", 1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffled(items, 8, seeded_rng("t", 1)))
    assert a != list(shuffled(items, 8, seeded_rng("t", 2)))
    assert list(shuffled(items, 0, seeded_rng("t", 1))) == items


def test_batch_contract(dataset):
    root, _ = dataset
    stored = {s.key: s for shard in done_and_missing(root)[0] for s in iter_shard(root, shard)}
    loader = build_loader(root, LoaderConfig(batch_size=4, num_workers=0, shuffle_buffer=0))
    batch = next(iter(loader.epoch_batches()))
    assert set(batch) == {"key", "text", "video_u8", "latent_mean", "latent_std", "t5", "t5_mask", "clip_text"}
    assert batch["video_u8"].dtype == torch.uint8 and batch["video_u8"].shape == (4, 50, 64, 64, 3)
    lengths = [len(stored[k].arrays["t5"]) for k in batch["key"]]
    assert batch["t5"].shape == (4, max(lengths), 16) and batch["t5"].dtype == torch.float32
    assert batch["t5_mask"].dtype == torch.bool and batch["t5_mask"].sum(1).tolist() == lengths
    for i, key in enumerate(batch["key"]):
        sample = stored[key]
        assert batch["text"][i] == sample.meta.text
        np.testing.assert_array_equal(batch["video_u8"][i].numpy(), decode_sync_mp4(sample.sync_mp4))
        np.testing.assert_array_equal(batch["t5"][i, : lengths[i]].numpy(), sample.arrays["t5"].astype(np.float32))
        assert not batch["t5"][i, lengths[i] :].any()
        for name in ("latent_mean", "latent_std", "clip_text"):
            assert batch[name].dtype == torch.float32
            np.testing.assert_array_equal(batch[name][i].numpy(), sample.arrays[name].astype(np.float32))


def test_mixing_is_applied_per_step(dataset):
    root, _ = dataset
    cfg = LoaderConfig(batch_size=4, num_workers=0)
    plain = list(build_loader(root, cfg, rank=1, world_size=2).epoch_batches())
    mixed = list(build_loader(root, cfg, rank=1, world_size=2, mix=MixConfig(prob=0.5, seed=3)).epoch_batches())
    for step, (a, b) in enumerate(zip(plain, mixed, strict=True)):  # generator = f(mix seed, step, rank)
        assert torch.equal(
            apply_to_batch(a, MixConfig(prob=0.5, seed=3), mixing_generator(3, step, 1))["video"], b["video"]
        )
    loader = build_loader(root, cfg, mix=MixConfig(prob=1.0, seed=3))
    batch = next(iter(loader.epoch_batches()))
    assert batch["video"].shape == (4, 50, 3, 64, 64) and batch["video"].dtype == torch.float32
    assert batch["mix"].mixed.all() and -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
    info = batch["mix"]
    for i in range(4):  # the target's columns keep its own level, the partner's its level
        target_cols = batch["video"][i, 0, 0, 32]
        side = slice(0, int(info.width[i]) // 2) if info.target_left[i] else slice(64 - int(info.width[i]) // 2, 64)
        level = (target_cols[side].mean().item() + 1) * 127.5
        own = sample_level(int(batch["text"][i].split()[-1]))
        assert abs(level - own) < 12


def test_corrupt_members_are_counted_and_skipped(dataset, tmp_path, caplog):
    root = copy_dataset(dataset, tmp_path / "data")
    keys = dataset[1]
    bad = corrupt(root, keys)
    cfg = LoaderConfig(batch_size=2, num_workers=0, shuffle_buffer=4, error_log_interval_s=3600)
    loader = build_loader(root, cfg)
    with caplog.at_level(logging.WARNING, logger="selva.loader"):
        batches = epoch_keys(loader)
    seen = Counter(flat(batches))
    assert len(batches) == 11  # the two bad samples' slots are re-drawn: still 11 steps
    assert set(seen) == set(keys) - set(bad) and sum(seen.values()) == 22
    assert loader.error_counts == {"sample": 2}
    records = [r for r in caplog.records if r.name == "selva.loader"]
    assert len(records) == 1 and "sample" in records[0].getMessage()  # rate-limited: one line per interval
    with_workers = build_loader(root, LoaderConfig(batch_size=2, num_workers=2, shuffle_buffer=4))
    assert set(flat(epoch_keys(with_workers))) == set(keys) - set(bad)
    assert with_workers.error_counts == {"sample": 2}  # a bad sample met again in a re-draw counts once


class _Trap:
    """Unpickling this creates ``path``: proof that the loader ran code from a shard."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_foreign_members_are_refused_unread(dataset, tmp_path):
    root, _ = dataset
    source = shard_tar_path(root, done_and_missing(root)[0][-1])  # the 2-sample shard
    evil, trap = tmp_path / "evil.tar", tmp_path / "pwned"
    with tarfile.open(source) as src, tarfile.open(evil, "w") as dst:
        members = src.getmembers()
        bad = members[0].name.split(".")[0]  # the first sample gets a pickle as an extra member
        for info in members:
            dst.addfile(info, src.extractfile(info))
            if info.name == f"{bad}.clip_text.npy":
                payload = pickle.dumps(_Trap(trap))
                extra = tarfile.TarInfo(f"{bad}.t5.pth")
                extra.size = len(payload)
                dst.addfile(extra, io.BytesIO(payload))
    loader = build_loader([str(evil)], LoaderConfig(batch_size=1, num_workers=0), samples_per_epoch=2)
    keys = flat(epoch_keys(loader))
    assert len(keys) == 2 and bad not in keys and loader.error_counts == {"sample": 1}
    assert not trap.exists()


def test_damaged_shard_is_counted_and_skipped(dataset, tmp_path):
    root = copy_dataset(dataset, tmp_path / "data")
    shard = done_and_missing(root)[0][1]
    marker = json.loads(shard_marker_path(root, shard).read_text())
    with tarfile.open(shard_tar_path(root, shard)) as tar:
        third = next(i for i in tar.getmembers() if i.name.startswith(marker["keys"][2]))
    with open(shard_tar_path(root, shard), "r+b") as handle:  # zero the header block of sample 2
        handle.seek(third.offset)
        handle.write(b"\x01" * 512)
    loader = build_loader(root, LoaderConfig(batch_size=2, num_workers=2, shuffle_buffer=2))
    seen = set(flat(epoch_keys(loader)))
    assert set(marker["keys"][:2]) <= seen and not set(marker["keys"][2:]) & seen
    assert len(seen) == NUM - 3 and loader.error_counts == {"shard": 3}


def test_url_lists(dataset, tmp_path):
    root, keys = dataset
    shards = done_and_missing(root)[0]
    tars = [str(shard_tar_path(root, s)) for s in shards]
    by_marker = source_from_urls(tars)  # local tars with their markers: counts known
    assert by_marker.counts_known and by_marker.samples_per_epoch == NUM
    braced = source_from_urls([str(root / "shards" / "train-{000000..000004}.tar")])
    assert braced.shards == by_marker.shards
    piped = [f"pipe:cat {t}" for t in tars]
    with pytest.raises(ShardError, match="samples_per_epoch"):
        source_from_urls(piped)
    loader = build_loader(piped, LoaderConfig(batch_size=2, num_workers=2), samples_per_epoch=NUM)
    batches = epoch_keys(loader)
    assert len(batches) == 11 and set(flat(batches)) <= set(keys) and loader.error_counts == {}
    assert len(set(flat(batches))) >= NUM - 4  # whole shards dealt, stops at the quota
    missing = build_loader(
        [*tars[:4], str(tmp_path / "gone.tar")], LoaderConfig(batch_size=2, num_workers=0), samples_per_epoch=NUM
    )
    assert len(epoch_keys(missing)) == 11 and missing.error_counts == {"shard": 1}


def test_partial_dataset_needs_allow_partial(dataset, tmp_path):
    root = copy_dataset(dataset, tmp_path / "data")
    shard = done_and_missing(root)[0][0]
    shard_marker_path(root, shard).unlink()
    with pytest.raises(ShardError, match="not done"):
        open_source(root)
    source = open_source(root, allow_partial=True)
    assert len(source.shards) == 4 and source.samples_per_epoch == NUM - PER_SHARD
    with pytest.raises(ShardError, match="without dataset.json"):
        open_source(tmp_path)


def _same_batch(a: dict, b: dict) -> None:
    assert a["key"] == b["key"] and a["text"] == b["text"]
    for name in ("video_u8", "video", "t5", "t5_mask", "latent_mean", "latent_std", "clip_text"):
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(a["mix"].lam, b["mix"].lam) and torch.equal(a["mix"].partner, b["mix"].partner)


@pytest.mark.parametrize("damaged", [False, True])
def test_resume_continues_the_same_stream(dataset, tmp_path, damaged):
    root = copy_dataset(dataset, tmp_path / "data") if damaged else dataset[0]
    if damaged:  # skipped samples shift the stream: the saved positions must account for them
        corrupt(root, dataset[1])
    cfg = LoaderConfig(batch_size=2, num_workers=2, shuffle_buffer=5, seed=11)
    mix = MixConfig(prob=0.5, seed=5)
    source = open_source(root)
    full = TrainLoader(source, cfg, mix=mix)
    stream = iter(full)
    reference = [next(stream) for _ in range(14)]  # into the second epoch
    for k in (5, 11):
        first = TrainLoader(source, cfg, mix=mix)
        head = iter(first)
        for i in range(k):
            _same_batch(next(head), reference[i])
        state = json.loads(json.dumps(first.state_dict()))
        del head
        resumed = TrainLoader(open_source(root), cfg, mix=mix)
        resumed.load_state_dict(state)
        tail = iter(resumed)
        for i in range(k, 14):
            _same_batch(next(tail), reference[i])
        assert resumed.epoch == 1
        if damaged and k == 11:  # the bad samples were met before the checkpoint: positions count them
            assert sum(state["positions"]) > k * 2
    if damaged:
        assert full.error_counts == {"sample": 2}


def test_resume_skips_without_decoding(dataset, monkeypatch):
    import training.sample_stream as stream

    calls = []
    real = stream.decode_frames
    monkeypatch.setattr(stream, "decode_frames", lambda data, out=None: calls.append(1) or real(data, out))
    cfg = LoaderConfig(batch_size=2, num_workers=0, shuffle_buffer=6)
    first = build_loader(dataset[0], cfg)
    batches = iter(first)
    for _ in range(4):
        next(batches)
    state = first.state_dict()
    expected = [next(batches)["key"] for _ in range(3)]
    calls.clear()
    resumed = build_loader(dataset[0], cfg)
    resumed.load_state_dict(state)
    batches = iter(resumed)
    assert [next(batches)["key"] for _ in range(3)] == expected
    assert len(calls) == 6  # only the samples of the three batches were decoded, none of the 8 skipped


def test_resume_refuses_another_layout(dataset):
    root, _ = dataset
    loader = build_loader(root, LoaderConfig(batch_size=2, num_workers=0))
    next(iter(loader.epoch_batches()))
    state = loader.state_dict()
    other = build_loader(root, LoaderConfig(batch_size=2, num_workers=2))
    with pytest.raises(ValueError, match="workers"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert (other.epoch, other.batch_in_epoch) == (1, 0)


def test_collate_in_a_worker_allocates_shared_memory():
    from training.sample_stream import collate

    rng = np.random.default_rng(0)
    samples = [
        {
            "key": f"k{i}",
            "text": "t",
            "video_u8": np.full((2, 4, 4, 3), i, np.uint8),
            "t5": rng.standard_normal((n, 3)).astype(np.float32),
            "t5_mask": np.ones(n, np.bool_),
            "clip_text": rng.standard_normal((5, 2)).astype(np.float16),
        }
        for i, n in enumerate((2, 4))
    ]
    shared, private = collate(samples, shared=True), collate(samples, shared=False)
    for name in ("video_u8", "t5", "t5_mask", "clip_text"):
        assert shared[name].is_shared() and not private[name].is_shared()
        assert torch.equal(shared[name], private[name])
    assert shared["t5_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert shared["clip_text"].dtype == torch.float32


def test_a_shard_read_that_fails_is_retried_then_stops_loudly(dataset):
    """A real fault: the shards are served over HTTP (read by curl through WebDataset's gopen) by a
    server that resets connections, at connect and mid-transfer."""
    root, keys = dataset
    shard = done_and_missing(root)[0][0]
    name = shard_tar_path(root, shard).name
    local = [s.key for s in iter_segment(ShardEntry(str(shard_tar_path(root, shard)), None), Segment(0), ErrorLog("t"))]
    with FaultServer(root / "shards") as server:
        entry = ShardEntry(f"{server.url}/{name}", None)
        errors = ErrorLog("test")
        server.reset_first(name, 1)  # refused outright, then one cut after the first samples
        got = [s.key for s in iter_segment(entry, Segment(0), errors, (0.01, 0.01))]
        server.reset_first(name, 1, after_bytes=30_000)
        got_cut = [s.key for s in iter_segment(entry, Segment(0, start=1), errors, (0.01, 0.01))]
        assert got == local and got_cut == local[1:]  # every sample once, in order, none lost
        assert errors.counts == {RETRY_KIND: 2} and server.resets[name] == 1

        # through the loader: a blip costs nothing; a store that stays down stops training by name
        urls = [f"{server.url}/{shard_tar_path(root, s).name}" for s in done_and_missing(root)[0]]
        cfg = LoaderConfig(batch_size=2, num_workers=0, read_retry_delays=(0.01, 0.01))
        server.reset_first(name, 2)
        loader = build_loader(urls, cfg, samples_per_epoch=NUM)
        assert len(epoch_keys(loader)) == 11 and loader.error_counts == {RETRY_KIND: 2}
        server.reset_first(name, -1)
        with pytest.raises(ShardReadError, match=rf"{name}: unreadable after 3 attempts: OSError: .*exit 56"):
            epoch_keys(build_loader(urls, cfg, samples_per_epoch=NUM))
        assert server.resets[name] == 3


def test_a_shard_server_that_goes_silent_stops_the_loader_instead_of_hanging(dataset):
    """A server that accepts and never sends a byte: each read ends after ``stall_s`` (curl exit 28),
    is retried, and the loader stops with ShardReadError naming the shard and what curl saw."""
    root, _keys = dataset
    shard = done_and_missing(root)[0][0]
    with silent_server() as port:
        url = f"http://127.0.0.1:{port}/{shard_tar_path(root, shard).name}"
        errors = ErrorLog("test")
        said = rf"{re.escape(url)}: unreadable after 2 attempts: OSError: {re.escape(url)}: curl exit 28: timed out"
        with pytest.raises(ShardReadError, match=said):
            list(iter_segment(ShardEntry(url, None), Segment(0), errors, (0.01,), stall_s=1.0))
    assert errors.counts == {RETRY_KIND: 1}
