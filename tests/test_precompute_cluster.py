"""Precompute's two-stage design on a Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``:
a head with CPUs only, a worker node that declares two encoder slots, a custom resource standing in for
GPUs). CPU decode tasks feed two encoder actors; the dataset must equal the one-stage pool's (run on the
same cluster first), under the same poisoned clip and with one encoder actor killed.

Never ``ray stop`` here: it kills every Ray process on the machine, other tests' included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from dataset_identity import assert_identical
from media_fixtures import make_clip

from pipelines.precompute import PrecomputeConfig, run_precompute
from preprocessing.manifest import read_manifest

CLIPS = [f"clip{i}" for i in range(8)]
POISON = "clip5"  # kills whichever process decodes it, every time (SELVA_FAULT_CRASH_CLIP)
ENCODERS = 2
DECODERS = 3


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-inputs")
    (root / "media").mkdir()
    for i, clip in enumerate(CLIPS):
        make_clip(root / "media" / f"{clip}.mp4", seconds=2.5, fps=25 if i % 2 else 30)
    path = root / "clips.tsv"
    path.write_text("id\tlabel\n" + "".join(f"{c}\tsound number {i % 3}\n" for i, c in enumerate(CLIPS)))
    return path


@pytest.fixture(scope="module")
def cluster():
    """(head node id, worker node id) of a two-node Ray cluster this process is connected to."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # an earlier test file's private Ray in this pytest worker
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": DECODERS, "include_dashboard": False})
    worker = nodes.add_node(num_cpus=ENCODERS, resources={"encoder_slot": ENCODERS})
    try:
        ray.init(address=nodes.address, logging_level="WARNING")
        yield nodes.head_node.node_id, worker.node_id
    finally:
        ray.shutdown()
        nodes.shutdown()


def _config(table: Path, out: Path, **design) -> PrecomputeConfig:
    # one death blames the clip (the default is two): each death restarts a worker, the suite's time
    return PrecomputeConfig(str(table), str(out), media_root=str(table.parent / "media"), samples_per_shard=2,
                            batch_size=2, max_clip_crashes=1, progress=False, **design)  # fmt: skip


def test_two_stage_on_two_nodes_builds_encoders_per_slot_and_writes_the_one_stage_dataset(
    table, cluster, tmp_path, monkeypatch
):
    head, worker = cluster
    monkeypatch.setenv("SELVA_FAULT_CRASH_CLIP", POISON)
    one_stage = tmp_path / "one-stage"
    baseline = run_precompute(_config(table, one_stage, workers=2))
    assert baseline.design == "one-stage" and baseline.encoder_builds == 2 + baseline.clip_crashes
    out = tmp_path / "dataset"
    shards = sorted({row.shard for row in read_manifest(one_stage / "manifest.parquet")})
    # each decoder, its shard done, waits until two have: decodes overlap iff they may run together
    monkeypatch.setenv("SELVA_TEST_DECODE_RENDEZVOUS", str(tmp_path / "decoders"))
    # the encoder actor writing the first shard dies once (as an OOM kill would): replaced, shard rewritten
    monkeypatch.setenv("SELVA_FAULT_EXIT_SHARD", f"encode-{shards[0]}:{tmp_path / 'encoder-died-once'}")
    cfg = _config(table, out, workers=DECODERS, encoder_actors=ENCODERS, encoder_resource="encoder_slot")
    report = run_precompute(cfg)

    assert report.design == "two-stage"
    # the encoders were built once per slot (plus the one replacement), not once per CPU or per shard
    assert (tmp_path / "encoder-died-once").exists() and report.infra_retries == 1
    assert report.encoder_builds == ENCODERS + 1
    # encoders only where the slots are; decoding on the head's CPUs (the worker node's two are the encoders')
    assert report.nodes["encode"] == {worker}
    assert head in report.nodes["decode"]
    assert report.max_decodes_at_once >= 2, report.decode_spans
    # batches follow the manifest: two clips per shard, one where the poisoned clip was dropped
    assert report.encode_batches == {2: len(shards) - 1, 1: 1}
    assert report.clip_crashes == cfg.max_clip_crashes and dict(report.failures_by_reason) == {"crashes_worker": 1}
    assert_identical(one_stage, out)


def test_a_laptop_run_beside_someone_elses_ray_head_starts_its_own_ray(table, cluster, tmp_path):
    """Without RAY_ADDRESS, ``selva precompute`` runs on a private Ray even while another Ray cluster runs on
    this machine (here the test's, whose address Ray records in /tmp/ray): it does not join it."""
    import subprocess
    import sys

    from tests.train_launch import REPO, explain, job_env

    env = {k: v for k, v in job_env().items() if k != "RAY_ADDRESS"}
    out = tmp_path / "private"
    cmd = [sys.executable, "-m", "selva_cli.main", "precompute", "--input", str(table), "--media-root",
           str(table.parent / "media"), "--out", str(out), "--workers", "1", "--samples-per-shard", "8",
           "--no-progress"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, explain(result)
    assert "must not be provided" not in result.stderr and "Traceback" not in result.stderr
    assert len(read_manifest(out / "manifest.parquet")) == len(CLIPS)
