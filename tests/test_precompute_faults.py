"""Precompute on local Ray under real faults: storage faults are retried or fail the shard, never
recorded as data; a clip that kills its worker is recorded and the job finishes.

The media are served by a local HTTP server that resets connections (tests/fault_server.py): the
faults happen inside the Ray workers, where FFmpeg reads. A worker killed by a clip is the one
test-only hook (``SELVA_FAULT_CRASH_CLIP``): a file that segfaults FFmpeg cannot be built on demand.
Four small runs (one of them fails early); datasets are compared as docs/shard-format.md
"What identical means" defines it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dataset_identity import assert_identical
from fault_server import FaultServer
from media_fixtures import make_clip

from pipelines.precompute import PrecomputeConfig, PrecomputeError, run_precompute
from preprocessing.manifest import read_manifest
from preprocessing.shard_reader import iter_shard
from preprocessing.shards import done_and_missing, read_failures

CLIPS = ["clip_a", "clip_b", "clip_c"]
FAST = (0.01, 0.01)  # the retry back-off, shortened


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    folder = root / "media"
    folder.mkdir()
    for i, clip in enumerate(CLIPS):
        make_clip(folder / f"{clip}.mp4", seconds=2.5, fps=30 if i % 2 else 25)
    table = root / "clips.tsv"
    table.write_text("id\tlabel\n" + "".join(f"{c}\tsound of {c}\n" for c in CLIPS))
    with FaultServer(folder) as server:
        yield table, server


def _cfg(table: Path, out: Path, media_root: str) -> PrecomputeConfig:
    return PrecomputeConfig(
        str(table), str(out), media_root=media_root, samples_per_shard=2, workers=2, progress=False,
        retry_delays=FAST,
    )  # fmt: skip


@pytest.fixture(scope="module")
def clean_run(media, tmp_path_factory) -> Path:
    table, _ = media
    out = tmp_path_factory.mktemp("clean") / "dataset"
    report = run_precompute(_cfg(table, out, str(table.parent / "media")))
    assert report.failed == 0 and report.read_retries == 0
    return out


def _shard_of(dataset: Path, source_id: str) -> str:
    return next(row.shard for row in read_manifest(dataset / "manifest.parquet") if row.source_id == source_id)


def test_storage_faults_are_retried_or_fail_the_shard_and_a_rerun_recovers(media, clean_run, tmp_path):
    table, server = media
    out = tmp_path / "dataset"
    cfg = _cfg(table, out, server.url)
    # a store that stays down for one file: 3 attempts, then the job stops naming shard, clip and fault
    # (the other shard, running meanwhile on the second worker, finishes and is kept)
    server.reset_first("clip_b.mp4", -1)
    with pytest.raises(PrecomputeError) as failed:
        run_precompute(cfg)
    message = str(failed.value)
    assert "clip_b.mp4 (clip_b, input row 2): storage or network fault in 3 attempts: ConnectionResetError" in message
    assert "nothing of the shard was written" in message
    assert server.resets["clip_b.mp4"] == 3
    done, missing = done_and_missing(out)
    assert missing == [_shard_of(out, "clip_b")], "the failed shard must stay undone, for the rerun"
    assert done == [s for s in done_and_missing(clean_run)[0] if s not in missing]  # the other one is kept
    for shard in done:  # nothing anywhere says clip_b is bad data
        assert "clip_b" not in {f.source_id for f in read_failures(out, shard)}

    # it clears after two more resets: retried, no failure row, the same dataset as a clean local run
    server.reset_first("clip_b.mp4", 2)
    report = run_precompute(cfg)
    assert report.read_retries == 2 and report.failed == 0 and server.resets["clip_b.mp4"] == 2
    assert "2 clip reads retried after storage or network faults" in report.table()
    assert_identical(clean_run, out)


def test_a_clip_that_kills_its_worker_is_recorded_and_the_job_finishes(media, clean_run, tmp_path, monkeypatch):
    table, _ = media
    out = tmp_path / "dataset"
    monkeypatch.setenv("SELVA_FAULT_CRASH_CLIP", "clip_c")  # SIGKILLs the worker at every attempt
    report = run_precompute(_cfg(table, out, str(table.parent / "media")))
    assert report.clip_crashes == 2 and report.infra_retries == 0
    assert report.ok == len(CLIPS) - 1 and dict(report.failures_by_reason) == {"crashes_worker": 1}
    failures = [f for shard in done_and_missing(out)[0] for f in read_failures(out, shard)]
    assert [(f.source_id, f.reason) for f in failures] == [("clip_c", "crashes_worker")]
    assert "clip_c.mp4" in failures[0].message and "died 2 times" in failures[0].message
    # apart from the recorded clip, the dataset is the clean run's
    clean = {s.meta.source_id: s for shard in done_and_missing(clean_run)[0] for s in iter_shard(clean_run, shard)}
    got = {s.meta.source_id: s for shard in done_and_missing(out)[0] for s in iter_shard(out, shard)}
    assert set(got) == set(CLIPS) - {"clip_c"}
    for source_id, sample in got.items():
        assert sample.sync_mp4 == clean[source_id].sync_mp4 and sample.meta == clean[source_id].meta
        assert all(np.array_equal(v, clean[source_id].arrays[k]) for k, v in sample.arrays.items())
    assert [p for p in out.rglob("*") if ".tmp" in p.name] == []  # no breadcrumb survives
