"""The shard format: round trip, determinism, crash safety, damage detection, no pickle, summary."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from preprocessing import shard_writer
from preprocessing.dataset_summary import print_dataset_summary
from preprocessing.errors import RejectReason
from preprocessing.manifest import ClipRow, ManifestRow, assign_shards, clip_key, manifest_hash, rows_by_shard
from preprocessing.manifest import write_manifest as save_manifest
from preprocessing.sample import ARRAY_FIELDS, Sample, SampleMeta
from preprocessing.shard_reader import iter_shard, iter_tar, load_npy
from preprocessing.shard_writer import FailureBudgetExceeded, ShardWriter, write_shard
from preprocessing.shards import (
    DatasetInfo,
    Failure,
    ShardError,
    done_and_missing,
    failures_path,
    read_dataset_info,
    read_failures,
    read_marker,
    refresh_sample_counts,
    shard_marker_path,
    shard_tar_path,
    write_dataset_info,
)

try:  # real media members when the media helper is present; the format itself does not care
    from preprocessing.compact import decode_flac, decode_sync_mp4, encode_flac, encode_sync_mp4
except ImportError:  # pragma: no cover - only while preprocessing.compact does not exist
    encode_sync_mp4 = encode_flac = decode_sync_mp4 = decode_flac = None

SHAPES = {"latent_mean": (10, 8), "latent_std": (10, 8), "t5": (12, 16), "t5_mask": (12,), "clip_text": (7, 16)}


def _media(index: int) -> tuple[bytes, bytes]:
    if encode_sync_mp4 is None:
        return f"mp4-{index}".encode(), f"flac-{index}".encode()
    frames = np.full((3, 16, 16, 3), 20 * index, dtype=np.uint8)
    audio = np.sin(np.linspace(0, 40 + index, 1600, dtype=np.float32)) * 0.5
    return encode_sync_mp4(frames), encode_flac(audio, 16000)


def _sample(row: ManifestRow, seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    length = 5 + seed % 7  # prompts differ in token count: t5/t5_mask have a variable first axis
    arrays["t5"] = arrays["t5"][:length]
    arrays["t5_mask"] = np.ones(length, dtype=bool)
    arrays["t5"] *= 30.0  # exercise fp16's coarser steps at larger magnitudes
    meta = SampleMeta(row.key, row.source_id, row.text, row.start, row.duration, row.split, row.shard)
    sync_mp4, audio_flac = _media(seed)
    return Sample(meta, sync_mp4, audio_flac, arrays)


def _make_dataset(root: Path, n: int = 7, per_shard: int = 4, seed: int = 0) -> dict[str, list[ManifestRow]]:
    clips = [
        ClipRow(
            clip_key(f"vid{i}_000010", 0.0, 2.0),
            f"vid{i}_000010",
            f"vid{i}_000010.mp4",
            0.0,
            2.0,
            f"sound {i}",
            "train",
            i + 1,
        )
        for i in range(n)
    ]
    rows = assign_shards(clips, seed=seed, samples_per_shard=per_shard)
    save_manifest(rows, root / "manifest.parquet")
    info = DatasetInfo(
        preset="tiny",
        media_root="/data/media",
        encoders={"t5": {"name": "minilm", "version": "1"}, "codec": {"name": "mel-identity", "version": "1"}},
        sequence_lengths={"latent": 10, "t5": 12, "clip_text": 7},
        seed=seed,
        samples_per_shard=per_shard,
        manifest_hash=manifest_hash(rows),
        clips={"train": n},
        shards={"train": len(rows_by_shard(rows))},
    )
    write_dataset_info(root, info)
    return rows_by_shard(rows)


def _write(root: Path, shard: str, rows: list[ManifestRow], failed: tuple[int, ...] = (), **kw):
    failures = [Failure(rows[i].key, rows[i].source_id, "silent", f"{rows[i].source_id}: peak 0") for i in failed]
    samples = [_sample(r, i) for i, r in enumerate(rows) if i not in failed]
    return write_shard(root, shard, rows, samples, failures, timings={"decode": 1.5}, **kw)


def test_round_trip(tmp_path):
    shards = _make_dataset(tmp_path)
    shard, rows = "train-000000", shards["train-000000"]
    marker = _write(tmp_path, shard, rows, failed=(1,))
    assert (marker.num_expected, marker.num_ok, marker.num_failed) == (4, 3, 1)
    assert marker.failures_by_reason == {"silent": 1} and marker.timings["decode"] == 1.5
    assert marker.fields["t5"] == {"dtype": "<f2", "shape": [-1, 16]}  # -1: the prompt's token count
    failed = rows[1]
    # the row and line of the input table travel with the failure (the writer takes them from the manifest)
    expected = Failure(failed.key, failed.source_id, "silent", f"{failed.source_id}: peak 0", failed.row, failed.line)
    assert read_failures(tmp_path, shard) == [expected]

    read = list(iter_shard(tmp_path, shard, verify_sha=True))
    assert [s.key for s in read] == [rows[i].key for i in (0, 2, 3)] == marker.keys  # manifest order
    for got, index in zip(read, (0, 2, 3), strict=True):
        want = _sample(rows[index], index)
        assert got.meta == want.meta and got.sync_mp4 == want.sync_mp4 and got.audio_flac == want.audio_flac
        assert set(got.arrays) == set(ARRAY_FIELDS)
        for name, array in want.arrays.items():
            stored = got.arrays[name]
            assert stored.dtype == ARRAY_FIELDS[name] and stored.shape == array.shape
            if ARRAY_FIELDS[name] == np.float16:
                # fp16 keeps 11 significant bits: relative error at most 2**-11 (plus subnormals near 0)
                error = np.abs(stored.astype(np.float32) - array)
                assert np.all(error <= np.abs(array) * 2.0**-11 + 2.0**-24)
                assert 0 < error.max()
            else:
                np.testing.assert_array_equal(stored, array)
    if decode_sync_mp4 is not None:
        assert decode_sync_mp4(read[0].sync_mp4).shape == (3, 16, 16, 3)
        assert decode_flac(read[0].audio_flac)[1] == 16000


def test_rewrite_is_byte_identical(tmp_path):
    shards = _make_dataset(tmp_path / "a")
    _make_dataset(tmp_path / "b")
    rows = shards["train-000000"]
    first = _write(tmp_path / "a", "train-000000", rows, failed=(2,))
    # samples handed over in another order still land in manifest order
    samples = [_sample(r, i) for i, r in enumerate(rows) if i != 2][::-1]
    failure = Failure(rows[2].key, rows[2].source_id, "silent", f"{rows[2].source_id}: peak 0")
    second = write_shard(tmp_path / "b", "train-000000", rows, samples, [failure])
    tar_a, tar_b = (shard_tar_path(tmp_path / d, "train-000000").read_bytes() for d in "ab")
    assert tar_a == tar_b and first.tar_sha256 == second.tar_sha256
    assert (
        failures_path(tmp_path / "a", "train-000000").read_bytes()
        == failures_path(tmp_path / "b", "train-000000").read_bytes()
    )
    with tarfile.open(shard_tar_path(tmp_path / "a", "train-000000")) as tar:
        infos = tar.getmembers()
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}
    assert infos[0].name == f"{rows[0].key}.json" and infos[1].name == f"{rows[0].key}.sync.mp4"


def test_crash_before_marker_leaves_shard_missing(tmp_path, monkeypatch):
    shards = _make_dataset(tmp_path)
    rows = shards["train-000000"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the tar and the marker")

    monkeypatch.setattr(shard_writer, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, "train-000000", rows)
    assert shard_tar_path(tmp_path, "train-000000").is_file()  # the tar was complete and renamed ...
    assert not shard_marker_path(tmp_path, "train-000000").exists()  # ... but there is no marker
    assert done_and_missing(tmp_path) == ([], ["train-000000", "train-000001"])
    with pytest.raises(ShardError, match="not done"):
        list(iter_shard(tmp_path, "train-000000"))

    monkeypatch.undo()  # the rerun completes the shard
    _write(tmp_path, "train-000000", rows)
    assert done_and_missing(tmp_path) == (["train-000000"], ["train-000001"])


def test_crash_mid_tar_leaves_nothing(tmp_path):
    rows = _make_dataset(tmp_path)["train-000000"]
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "train-000000", rows) as writer:
        writer.add(_sample(rows[0], 0))
        raise RuntimeError("worker died")
    assert list((tmp_path / "shards").iterdir()) == []  # no tar, no temporary


def test_writer_refuses_incomplete_or_bad_shards(tmp_path):
    rows = _make_dataset(tmp_path)["train-000000"]
    with pytest.raises(ShardError, match="out of manifest order"), ShardWriter(tmp_path, "train-000000", rows) as w:
        w.add(_sample(rows[1], 1))
    with (
        pytest.raises(ShardError, match="neither a sample nor a failure"),
        ShardWriter(tmp_path, "train-000000", rows) as w,
    ):
        w.add(_sample(rows[0], 0))
        w.finish()
    bad = _sample(rows[0], 0)
    bad.arrays["t5"] = bad.arrays["t5"] * 1e5  # beyond fp16's 65504
    with pytest.raises(ValueError, match="overflow"), ShardWriter(tmp_path, "train-000000", rows) as w:
        w.add(bad)
    extra = _sample(rows[0], 0)
    extra.arrays["weights"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="unknown arrays"), ShardWriter(tmp_path, "train-000000", rows) as w:
        w.add(extra)
    with pytest.raises(ValueError), ShardWriter(tmp_path, "train-000000", rows) as w:
        w.reject(rows[0].key, "not-a-reason", "?")
    assert not shard_marker_path(tmp_path, "train-000000").exists()
    assert list((tmp_path / "shards").iterdir()) == []


def test_failure_budget(tmp_path):
    rows = _make_dataset(tmp_path)["train-000000"]
    with pytest.raises(FailureBudgetExceeded, match="2 of 4"):
        _write(tmp_path, "train-000000", rows, failed=(0, 3), max_failed_fraction=0.25)
    assert not shard_marker_path(tmp_path, "train-000000").exists()
    assert not shard_tar_path(tmp_path, "train-000000").exists()
    assert [f.reason for f in read_failures(tmp_path, "train-000000")] == ["silent", "silent"]  # kept for inspect


def test_truncated_tar_is_refused(tmp_path):
    rows = _make_dataset(tmp_path)["train-000000"]
    marker = _write(tmp_path, "train-000000", rows)
    tar = shard_tar_path(tmp_path, "train-000000")
    data = tar.read_bytes()
    for cut in (len(data) // 3, 512 * 7, len(data) - 10240 - 1024):  # mid-member, at a header, before the end
        with pytest.raises(ShardError, match="truncated|damaged"):
            list(iter_tar(io.BytesIO(data[:cut]), source="cut.tar", expected_keys=marker.keys))
    tar.write_bytes(data[: len(data) // 2])
    assert done_and_missing(tmp_path)[1] == ["train-000000", "train-000001"]  # size differs from the marker
    with pytest.raises(ShardError, match=r"train-000000\.tar"):
        list(iter_shard(tmp_path, "train-000000"))


def test_key_mismatch_is_refused(tmp_path):
    shards = _make_dataset(tmp_path)
    rows = shards["train-000000"]
    marker = _write(tmp_path, "train-000000", rows)
    data = shard_tar_path(tmp_path, "train-000000").read_bytes()
    with pytest.raises(ShardError, match="manifest expects"):
        list(iter_tar(io.BytesIO(data), source="x.tar", expected_keys=marker.keys[::-1]))
    # a manifest rebuilt with another seed no longer matches the shard
    _make_dataset(tmp_path, seed=1)
    with pytest.raises(ShardError, match="manifest"):
        list(iter_shard(tmp_path, "train-000000"))


class _Trap:
    """Unpickling this creates ``path``: proof that a reader ran code from the shard."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _tampered(tmp_path: Path, replace: str, payload: bytes, new_suffix: str | None = None) -> bytes:
    """A real one-shard tar whose first sample's ``replace`` member is swapped for ``payload``."""
    rows = _make_dataset(tmp_path)["train-000000"]
    _write(tmp_path, "train-000000", rows)
    buffer = io.BytesIO()
    with tarfile.open(shard_tar_path(tmp_path, "train-000000")) as src, tarfile.open(fileobj=buffer, mode="w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            if info.name == f"{rows[0].key}.{replace}":
                data = payload
                info.name = f"{rows[0].key}.{new_suffix or replace}"
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_pickle_is_never_executed(tmp_path):
    trap = tmp_path / "pwned"
    evil = io.BytesIO()
    np.save(evil, np.array([_Trap(trap)], dtype=object), allow_pickle=True)
    np.load(io.BytesIO(evil.getvalue()), allow_pickle=True)  # the payload is live ...
    assert trap.exists()
    trap.unlink()

    tampered = _tampered(tmp_path / "a", "t5.npy", evil.getvalue())
    with pytest.raises(ShardError, match=r"evil\.tar: member [0-9a-f]{16}\.t5\.npy: object arrays"):
        list(iter_tar(io.BytesIO(tampered), source="evil.tar"))
    tampered = _tampered(tmp_path / "b", "t5.npy", pickle.dumps(_Trap(trap)), new_suffix="t5.pth")
    with pytest.raises(ShardError, match=r"member [0-9a-f]{16}\.t5\.pth: unexpected member type"):
        list(iter_tar(io.BytesIO(tampered), source="evil.tar"))
    tampered = _tampered(tmp_path / "c", "t5.npy", pickle.dumps(_Trap(trap)))  # a bare pickle named .npy
    with pytest.raises(ShardError, match="not a valid .npy"):
        list(iter_tar(io.BytesIO(tampered), source="evil.tar"))
    with pytest.raises(ShardError, match="dtype"):
        load_npy(_npy(np.zeros(3, np.float64)), np.dtype(np.float16), "x")
    with pytest.raises(ShardError, match="data bytes"):
        load_npy(_npy(np.zeros(3, np.float16))[:-2], np.dtype(np.float16), "x")
    assert not trap.exists()  # ... and no reader path ran it


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_done_listing_checks_size_and_sha(tmp_path):
    shards = _make_dataset(tmp_path)
    for shard, rows in shards.items():
        _write(tmp_path, shard, rows)
    assert done_and_missing(tmp_path) == (["train-000000", "train-000001"], [])
    tar = shard_tar_path(tmp_path, "train-000001")
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # same size, different content
    tar.write_bytes(bytes(data))
    assert done_and_missing(tmp_path)[1] == []
    assert done_and_missing(tmp_path, verify_sha=True)[1] == ["train-000001"]


def test_dataset_json_and_summary(tmp_path):
    shards = _make_dataset(tmp_path)
    _write(tmp_path, "train-000000", shards["train-000000"], failed=(1, 2))
    with pytest.raises(FailureBudgetExceeded):
        _write(tmp_path, "train-000001", shards["train-000001"], failed=(0, 1, 2), max_failed_fraction=0.5)
    info = refresh_sample_counts(tmp_path)
    assert info.samples == {"train": {"ok": 2, "failed": 2, "shards_done": 1}}
    assert read_dataset_info(tmp_path) == info
    assert read_marker(tmp_path, "train-000001") is None

    lines: list[str] = []
    print_dataset_summary(tmp_path, out=lines.append)
    text = "\n".join(lines)
    assert "preset tiny" in text and "minilm (1)" in text and "mel-identity" in text
    train = next(line for line in lines if line.startswith("train"))
    assert train.split() == ["train", "1/2", "7", "2", "2"]
    assert "failures by reason: silent 2" in text
    assert "train-000001: no marker; failures recorded: silent 3" in text
    assert RejectReason.SILENT.value == "silent"


def test_summary_of_empty_folder(tmp_path):
    lines: list[str] = []
    print_dataset_summary(tmp_path, out=lines.append)
    assert any("no dataset.json" in line for line in lines) and any("manifest" in line for line in lines)


def test_webdataset_reads_the_shard(tmp_path):
    import webdataset as wds

    from preprocessing.shard_reader import decode_sample

    rows = _make_dataset(tmp_path)["train-000000"]
    marker = _write(tmp_path, "train-000000", rows, failed=(0,))
    dataset = wds.WebDataset(str(shard_tar_path(tmp_path, "train-000000")), shardshuffle=False, empty_check=False)
    got = []
    for item in dataset:
        members = {k: v for k, v in item.items() if not k.startswith("__")}
        got.append(decode_sample(item["__key__"], members, item["__url__"]))
    assert [s.key for s in got] == marker.keys
    assert got[0].arrays["t5_mask"].dtype == np.bool_
