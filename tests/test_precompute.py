"""The Ray precompute job end to end: local Ray (2 CPUs), real + synthetic + broken clips.

One clean run is shared by the tests (Ray start-up and decoding dominate their cost); reruns go
to their own folders and are compared with it byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_shared, shared_dir
from media_fixtures import make_clip
from tracking_servers import no_mlflow_env, silent_server

from pipelines.precompute import PrecomputeConfig, prepare_dataset, resolved
from preprocessing.manifest import read_manifest
from preprocessing.prompt_store import PromptStore, read_empty_prompt
from preprocessing.shard_reader import iter_shard
from preprocessing.shards import (
    done_and_missing,
    read_dataset_info,
    read_failures,
    read_input_failures,
    read_marker,
)
from selva_cli.main import main

REAL = ["0B4dYTMsgHA_000130", "F8Zt3mYlOqU_000094"]
GOOD_SYNTHETIC = ["synth_a", "synth_b", "synth_c", "synth_d"]
EXPECTED_FAILURES = {
    "zero_bytes": "undecodable",
    "truncated": "undecodable",
    "audio_only": "no_video",
    "video_only": "no_audio",
    "short": "too_short",
    "silent": "silent",
    "text_as_mp4": "undecodable",
    "nowhere": "missing_file",
}

LABELS = {"synth_a": "a synthetic tone", "synth_b": "a synthetic tone", "synth_c": "a synthetic tone",
          "synth_d": "a synthetic chirp", "silent": "a synthetic chirp"}


def _make_inputs(root: Path) -> Path:
    media = root / "media"
    media.mkdir(parents=True)
    for clip_id in REAL:
        shutil.copy(shared_dir() / "data" / "real" / f"{clip_id}.mp4", media / f"{clip_id}.mp4")
    for i, clip_id in enumerate(GOOD_SYNTHETIC):
        make_clip(media / f"{clip_id}.mp4", seconds=2.5, fps=30 if i % 2 else 25)
    (media / "zero_bytes.mp4").write_bytes(b"")
    make_clip(media / "full.mp4", seconds=3.0)
    data = (media / "full.mp4").read_bytes()
    (media / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (media / "full.mp4").unlink()
    make_clip(media / "audio_only.mp4", seconds=3.0, video=False)
    make_clip(media / "video_only.mp4", seconds=3.0, audio=False)
    make_clip(media / "short.mp4", seconds=1.0)
    make_clip(media / "silent.mp4", seconds=3.0, silent=True)
    (media / "text_as_mp4.mp4").write_text("this is not a video\n")
    rows = ["id\tlabel"]
    # the synthetic clips share labels, as a label dataset does: fewer distinct prompts than clips
    rows += [f"{c}\t{LABELS.get(c, f'sound of {c}')}" for c in REAL + GOOD_SYNTHETIC + list(EXPECTED_FAILURES)]
    rows.append("empty_text\t ")
    (media / "empty_text.mp4").write_bytes((media / "synth_a.mp4").read_bytes())
    table = root / "clips.tsv"
    table.write_text("\n".join(rows) + "\n")
    return table


def _args(table: Path, out: Path, *extra: str) -> list[str]:
    return ["precompute", "--input", str(table), "--media-root", str(table.parent / "media"), "--out", str(out),
            "--samples-per-shard", "3", "--workers", "2", "--no-progress", "--max-failed-fraction", "1.0", *extra]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    require_shared(shared_dir() / "data" / "real", "the real clips")
    return _make_inputs(tmp_path_factory.mktemp("precompute-inputs"))


@pytest.fixture(scope="module")
def clean_run(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "dataset"
    assert main(_args(inputs, out)) == 0
    return out


def _shard_files(dataset: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((dataset / "shards").glob("*.tar"))}


def _training_files(dataset: Path) -> tuple[dict, dict[str, bytes], dict[str, list[bytes]]]:
    """dataset.json's latent statistics, the empty prompt's files, and the store's features by prompt
    (its chunking follows --workers, its content must not)."""
    stats = read_dataset_info(dataset).latent_stats
    empty = {p.name: p.read_bytes() for p in sorted((dataset / "text").glob("empty.*"))}
    store = PromptStore(dataset)
    return stats, empty, {text: [a.tobytes() for a in store.get(text)] for text in sorted(store.prompts())}


def _distinct_prompts(dataset: Path) -> int:
    return len({r.text for r in read_manifest(dataset / "manifest.parquet")})


def test_every_good_clip_is_in_a_shard_and_every_bad_one_is_recorded(clean_run):
    done, missing = done_and_missing(clean_run)
    assert missing == [] and done
    rows = {r.key: r for r in read_manifest(clean_run / "manifest.parquet")}
    written = {}
    for shard in done:
        for sample in iter_shard(clean_run, shard):
            written[sample.meta.source_id] = sample
            assert sample.arrays["latent_mean"].shape == (63, 40)  # tiny: 2 s, 40 mel bands
            assert sample.arrays["clip_text"].shape == (77, 64)
    assert set(written) == set(REAL + GOOD_SYNTHETIC)
    failures = {f.source_id: f for shard in done for f in read_failures(clean_run, shard)}
    assert {k: f.reason for k, f in failures.items()} == EXPECTED_FAILURES
    for source_id, failure in failures.items():
        assert failure.message, source_id
        assert (failure.row, failure.line) == (rows[failure.key].row, rows[failure.key].row + 1)  # header line 1
    assert len(rows) == len(written) + len(failures)
    # the empty prompt never reached a shard: it is a recorded rejection of the input table
    rejected = read_input_failures(clean_run)
    assert [(f.source_id, f.reason, f.line) for f in rejected] == [("empty_text", "bad_text", len(rows) + 2)]


def test_a_second_run_is_a_no_op_and_a_fresh_run_is_byte_identical(clean_run, inputs, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (clean_run / "shards").iterdir()}
    assert main(_args(inputs, clean_run)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in (clean_run / "shards").iterdir()}

    again = tmp_path / "again"
    assert main(_args(inputs, again)) == 0
    out = capsys.readouterr().out
    # each distinct prompt encoded once per dataset, by the text stage; none by the shard workers
    assert f"text:   {_distinct_prompts(again)} distinct prompts encoded, 0 already stored\n" in out
    assert _distinct_prompts(again) < len(read_manifest(again / "manifest.parquet"))
    assert _shard_files(again) == _shard_files(clean_run)
    assert _training_files(again) == _training_files(clean_run)
    assert (again / "manifest.parquet").read_bytes() == (clean_run / "manifest.parquet").read_bytes()


def test_mlflow_on_a_server_that_never_answers_costs_the_job_its_exit_deadline(clean_run, inputs, capsys):
    """The CLI path end to end: the tracker starts with the job, logs its params and final metrics
    and is closed with the 10 s deadline. The job is a no-op rerun: a real one-shard precompute
    costs ~20 s of Ray start-up on a 2-core machine, which would leave a 30 s ceiling no margin,
    and the outage's cost does not depend on what the job did."""
    with no_mlflow_env(), silent_server() as port:
        uri = f"http://127.0.0.1:{port}"
        os.environ["MLFLOW_TRACKING_URI"] = uri  # no_mlflow_env removes both afterwards
        # a user's request timeout longer than the close deadline: the deadline is then the only bound that can
        # end the wait. (With the tracker's own 5 s timeout and one retry, a request can fail at ~10 s, which
        # races the 10 s deadline on a loaded machine: either line is true, but a test must know which comes.)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "60"
        began = time.monotonic()
        assert main(_args(inputs, clean_run, "--mlflow")) == 0
        took = time.monotonic() - began
    assert took < 30.0, f"the job took {took:.1f} s"
    out, err = capsys.readouterr()
    assert "nothing to do" in out and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "MLflow" in line]
    assert line.startswith(f"warning: MLflow tracking at {uri}: ") and "values not sent" in line
    assert "(still pending at the 10 s deadline)" in line and line.endswith("the dataset is not affected")


def test_sigkill_then_rerun_equals_a_clean_run(clean_run, inputs, tmp_path, capsys):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "selva_cli.main", *_args(inputs, out, "--workers", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("shards/*.json")):  # the first done-marker
            assert proc.poll() is None, "the job finished before it could be killed"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    done_before, missing_before = done_and_missing(out)
    assert done_before and missing_before, "the kill should leave work to resume"

    capsys.readouterr()
    assert main(_args(inputs, out)) == 0
    assert "text:   0 distinct prompts encoded" in capsys.readouterr().out  # the killed run stored them all
    assert _shard_files(out) == _shard_files(clean_run)
    # statistics from per-shard moments: shards written by two runs give the one-go numbers, bit for bit
    assert _training_files(out) == _training_files(clean_run)
    for name, mtime in finished.items():  # finished shards were not redone
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_sigterm_ends_the_driver_like_ctrl_c_and_a_rerun_finishes(clean_run, inputs, tmp_path):
    """``kill`` (SIGTERM) on the driver: the finished-work line and exit 130, as Ctrl-C, not Ray's crash
    handler's stack dump; the MLflow run is closed as KILLED; a rerun completes to the clean run's bytes."""
    out = tmp_path / "terminated"
    cmd = [sys.executable, "-m", "selva_cli.main", *_args(inputs, out, "--workers", "1", "--mlflow")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the store in the dataset folder
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("shards/*.json")):
            assert proc.poll() is None, "the job finished before it could be stopped"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` or a scheduler's stop does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; finished work is kept" in err and "SIGTERM received" not in err, err[-2000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert main(_args(inputs, out)) == 0
    assert _shard_files(out) == _shard_files(clean_run)


def test_what_training_reads_from_the_dataset(clean_run):
    from selva.presets import TINY
    from selva.text import build_text_encoders
    from training.dataset_stats import configure_generator

    info = read_dataset_info(clean_run)
    samples = [s for shard in done_and_missing(clean_run)[0] for s in iter_shard(clean_run, shard)]
    train = [s for s in samples if s.meta.split == "train"]
    assert train and info.latent_stats["clips"] == len(train)
    # latent statistics = an independent numpy computation over every train sample read back
    latents = np.concatenate([s.arrays["latent_mean"] for s in train]).astype(np.float64)
    assert info.latent_stats["frames"] == len(latents)
    np.testing.assert_allclose(info.latent_stats["mean"], latents.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(info.latent_stats["std"], latents.std(0, ddof=1), rtol=1e-12)

    # the prompt store: every distinct prompt once; the shards carry exactly its bytes
    store = PromptStore(clean_run)
    indexes = [json.loads(p.read_text()) for p in (clean_run / "text").glob("prompts-*.json")]
    stored = [prompt for index in indexes for prompt in index["prompts"]]
    assert sorted(stored) == sorted({r.text for r in read_manifest(clean_run / "manifest.parquet")})
    for sample in samples:
        t5, mask, clip_text = store.get(sample.meta.text)
        assert np.array_equal(sample.arrays["t5"], t5) and np.array_equal(sample.arrays["clip_text"], clip_text)
        assert np.array_equal(sample.arrays["t5_mask"], mask)

    # the features equal encoding the prompt in this process (another process: thread counts may move
    # the last float32 bits, so compare within one float16 step), and the empty prompt is TextEncoder.empty()
    t5_encoder, clip_encoder = build_text_encoders("embedded", TINY)
    text = train[0].meta.text
    n = int(t5_encoder.encode([text]).mask.sum())
    np.testing.assert_allclose(store.get(text)[0], t5_encoder.encode([text]).tokens[0, :n].numpy(), rtol=2e-3,
                               atol=1e-4)
    np.testing.assert_allclose(store.get(text)[2], clip_encoder.encode([text]).tokens[0].numpy(), rtol=2e-3,
                               atol=1e-4)
    empty = read_empty_prompt(clean_run, info.empty_prompt)
    t5_empty, clip_empty = t5_encoder.empty(), clip_encoder.empty()
    assert empty.clip_text.shape == (TINY.generator.text_seq_len, TINY.generator.text_dim)
    np.testing.assert_allclose(empty.clip_text, clip_empty.tokens[0].numpy(), rtol=2e-3, atol=1e-4)
    assert np.array_equal(empty.t5_mask, t5_empty.mask[0, : len(empty.t5_mask)].numpy()) and empty.t5_mask.all()
    np.testing.assert_allclose(empty.t5, t5_empty.tokens[0, : len(empty.t5)].numpy(), rtol=2e-3, atol=1e-4)
    assert np.abs(empty.clip_text).max() > 0.01  # not the zeros the generator had before

    # used by the model: the generator normalises the train latents to zero mean, unit std per channel
    generator = TINY.build_generator().double()
    assert configure_generator(generator, clean_run) == "dataset"
    assert np.array_equal(generator.empty_string_feat.numpy(), empty.clip_text.astype(np.float64))
    assert empty.clip_text.dtype == np.float16  # stored as every prompt's features are
    normalised = generator.normalize(torch.from_numpy(latents)[None])[0]
    np.testing.assert_allclose(normalised.mean(0).numpy(), 0.0, atol=1e-9)
    np.testing.assert_allclose(normalised.std(0).numpy(), 1.0, atol=1e-9)


def test_retry_failed_reattempts_only_the_failures(clean_run, inputs, tmp_path):
    out = tmp_path / "retry"
    shutil.copytree(clean_run, out)
    media = inputs.parent / "media"
    nowhere_row = next(r for r in read_manifest(out / "manifest.parquet") if r.source_id == "nowhere")
    make_clip(media / "nowhere.mp4", seconds=2.5)  # the missing file turns up
    before = _shard_files(out)
    had_failures = {s for s in done_and_missing(out)[0] if read_marker(out, s).num_failed}
    try:
        assert main(_args(inputs, out, "--retry-failed")) == 0
    finally:
        (media / "nowhere.mp4").unlink()
    keys = [s.meta.source_id for s in iter_shard(out, nowhere_row.shard)]
    assert "nowhere" in keys
    assert "nowhere" not in {f.source_id for f in read_failures(out, nowhere_row.shard)}
    # samples kept from the first attempt are byte-for-byte the same
    old = {s.key: s for s in iter_shard(clean_run, nowhere_row.shard)}
    assert old
    for sample in iter_shard(out, nowhere_row.shard):
        if sample.key in old:
            assert sample.sync_mp4 == old[sample.key].sync_mp4
            assert all(np.array_equal(v, old[sample.key].arrays[k]) for k, v in sample.arrays.items())
    # shards without failures were not touched
    after = _shard_files(out)
    for name, data in before.items():
        if name.removesuffix(".tar") not in had_failures:
            assert after[name] == data, name


def test_a_worker_that_dies_is_replaced_and_its_shard_redone(inputs, tmp_path, monkeypatch, capsys):
    """A worker dies once in the text stage and once in a shard: both are rerun on fresh workers."""
    out = tmp_path / "crash"
    text_flag, shard_flag = tmp_path / "text-crashed-once", tmp_path / "shard-crashed-once"
    monkeypatch.setenv("SELVA_FAULT_EXIT_SHARD", f"text-stage:{text_flag},train-000000:{shard_flag}")
    assert main(_args(inputs, out)) == 0
    assert text_flag.exists() and shard_flag.exists()
    printed = capsys.readouterr().out
    assert "text stage: worker died" in printed
    assert "2 tasks (shards or the text stage) rerun on fresh workers after a worker died" in printed
    assert done_and_missing(out)[1] == []
    prompts = {row.text for row in read_manifest(out / "manifest.parquet")}
    assert PromptStore(out).prompts() == prompts  # every prompt stored, once, despite the death


def test_a_shard_over_its_failure_budget_stops_the_job_loudly(inputs, tmp_path, capsys):
    out = tmp_path / "budget"
    assert main([*_args(inputs, out), "--max-failed-fraction", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "inputs rejected (budget 50%)" in err and "rerun the same command to resume" in err
    line = next(line for line in err.splitlines() if "inputs rejected" in line)
    shard = line.split(":")[1].strip()  # error: <shard>: N of M inputs rejected ...: the shard named once
    assert line.startswith(f"error: {shard}: ") and line.count(shard) == 1 and "Exceeded" not in line
    for marker in (out / "shards").glob("*.json"):  # what finished is complete and within budget
        shard = marker.stem
        m = read_marker(out, shard)
        assert m.num_failed <= 0.5 * m.num_expected


def test_a_changed_input_table_is_refused_for_an_existing_dataset(clean_run, inputs, tmp_path, capsys):
    changed = tmp_path / "clips.tsv"
    changed.write_text(inputs.read_text() + "extra_clip\tone more sound\n")
    out = tmp_path / "copy"
    shutil.copytree(clean_run, out)
    args = _args(inputs, out)
    args[args.index("--input") + 1] = str(changed)
    assert main(args) == 1
    assert "input table" in capsys.readouterr().err


def test_media_moved_to_new_storage_and_relative_paths(clean_run, inputs, tmp_path, monkeypatch):
    # the manifest step ran with the media on local disk ...
    local = tmp_path / "local" / "media"
    shutil.copytree(inputs.parent / "media", local)
    shutil.copy(inputs, tmp_path / "clips.tsv")
    cfg = PrecomputeConfig(input=str(tmp_path / "clips.tsv"), out=str(tmp_path / "moved"), media_root=str(local),
                           samples_per_shard=3, max_failed_fraction=1.0)
    prepare_dataset(resolved(cfg))
    # ... then the media moved to shared storage; the rerun names the new root, every path relative to
    # the driver's working directory (Ray workers run elsewhere: the driver resolves them once)
    (tmp_path / "shared").mkdir()
    local.rename(tmp_path / "shared" / "media")
    monkeypatch.chdir(tmp_path)
    argv = ["precompute", "--input", "clips.tsv", "--media-root", "shared/media", "--out", "moved",
            "--samples-per-shard", "3", "--workers", "2", "--no-progress", "--max-failed-fraction", "1.0"]
    assert main(argv) == 0
    out = tmp_path / "moved"
    done, missing = done_and_missing(out)
    assert missing == []
    failures = {f.source_id: f.reason for shard in done for f in read_failures(out, shard)}
    assert failures == EXPECTED_FAILURES  # "nowhere" never existed; nothing else is missing
    assert _shard_files(out) == _shard_files(clean_run)


def test_paths_are_resolved_once_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolved(PrecomputeConfig(input="t.tsv", out="data/v1", media_root="~/media", weights="s3://bucket/w"))
    assert cfg.input == str(tmp_path / "t.tsv") and cfg.out == str(tmp_path / "data" / "v1")
    assert cfg.media_root == os.path.expanduser("~/media") and cfg.weights == "s3://bucket/w"  # URLs unchanged


def test_the_trainer_trains_on_what_precompute_wrote(clean_run, tmp_path):
    """The real clips (and the synthetic ones) through precompute -> `python -m training.train`: a few
    steps on real shards, one process. The job's tracking server is a closed port: training finishes
    (exit 0, the export written) with one warning (the trainer's outage acceptance point)."""
    import subprocess
    import sys

    from tests.tracking_servers import closed_port
    from tests.train_launch import REPO, explain, job_env

    out = tmp_path / "train"
    cmd = [sys.executable, "-m", "training.train", "--config", "configs/train/tiny.yaml", f"dataset={clean_run}",
           f"out={out}", "steps=3", "loader.batch_size=2", "loader.num_workers=0", "checkpoint_every=3",
           "validation.audio_clips=0", f"tracking_uri=http://127.0.0.1:{closed_port()}"]
    result = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, explain(result)
    assert result.stderr.count("warning: MLflow tracking at") == 1, result.stderr[-3000:]
    assert "3 of 3" in result.stdout
    state = json.loads((out / "checkpoints" / "step-00000003" / "trainer-rank00000.json").read_text())
    assert len(state["losses"]) == 3 and all(0 < x < 100 for x in state["losses"])
    assert (out / "final" / "generator.safetensors").is_file()


@pytest.mark.parametrize("design", [(), ("--encoder-actors", "1")], ids=["one-stage", "two-stage"])
def test_retry_failed_rewrites_a_shard_whose_tar_was_lost(clean_run, inputs, tmp_path, design):
    """A marker whose tar is gone is no base to keep samples from: --retry-failed writes that shard again
    from scratch (as a plain rerun does), in both designs, to the clean run's bytes."""
    out = tmp_path / "lost"
    shutil.copytree(clean_run, out)
    shard = next(s for s in done_and_missing(out)[0] if read_marker(out, s).num_failed)  # one retry would touch
    (out / "shards" / f"{shard}.tar").unlink()
    assert main(_args(inputs, out, "--retry-failed", *design)) == 0
    assert _shard_files(out) == _shard_files(clean_run)


def test_a_resume_with_another_batch_size_or_device_is_refused(clean_run, inputs, tmp_path, capsys):
    """Encoder outputs may depend on batch composition and device kind: one dataset keeps one setting."""
    out = tmp_path / "other-batch"
    shutil.copytree(clean_run, out)
    assert main(_args(inputs, out, "--batch-size", "5")) == 1
    err = capsys.readouterr().err
    assert "was encoded with --batch-size 16; this run asks for 5" in err and "Traceback" not in err
    assert main(_args(inputs, out, "--gpus-per-worker", "1")) == 1
    assert "was encoded with encoders on cpu; this run asks for cuda" in capsys.readouterr().err
    assert _shard_files(out) == _shard_files(clean_run)  # nothing was touched


def test_credentials_in_a_media_url_are_never_stored(inputs, tmp_path, capsys):
    """user:password in --media-root reaches no file and no MLflow param; a rerun must give it again."""
    from pipelines.precompute import PrecomputeConfig, PrecomputeError, as_params, prepare_dataset, run_precompute
    from preprocessing.shards import Failure, read_failures, write_failures

    url = "https://alice:s3cret@media.invalid/clips/"
    out = tmp_path / "url"
    cfg = PrecomputeConfig(input=str(inputs), out=str(out), media_root=url, samples_per_shard=3,
                           max_failed_fraction=1.0, progress=False)
    prepare_dataset(cfg)
    stored = (out / "dataset.json").read_text()
    assert "s3cret" not in stored and "https://***@media.invalid/clips/" in stored
    assert not any("s3cret" in v for v in as_params(cfg).values())
    with pytest.raises(PrecomputeError, match="without its credentials"):
        run_precompute(replace(cfg, media_root=None))
    write_failures(out, "train-000000", [Failure("k", "s", "undecodable", f"cannot open {url}a.mp4?token=abc")])
    assert read_failures(out, "train-000000")[0].message == "cannot open https://***@media.invalid/clips/a.mp4?token=***"


@pytest.mark.parametrize(("flags", "says"), [
    (("--encoder-actors", "1", "--encoder-resource", "GPU"), "is not a custom resource name"),
    (("--encoder-actors", "1", "--encoder-resource", "node:10.0.0.1"), "is not a custom resource name"),
    (("--encoder-actors", "1", "--encoder-cpus", "nan"), "--encoder-cpus must be a finite number"),
    (("--encoder-actors", "1", "--gpus-per-encoder", "inf"), "--gpus-per-encoder must be a finite number"),
])
def test_impossible_encoder_settings_are_one_line_before_any_work(inputs, tmp_path, capsys, flags, says):
    out = tmp_path / "bad"
    assert main(_args(inputs, out, *flags)) != 0
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and not out.exists()


def test_actors_this_machine_cannot_place_stop_the_job_instead_of_waiting(clean_run, inputs, tmp_path, capsys):
    """More GPUs than this machine has (this process's own Ray cannot grow): one line, no hang. 1000 per actor,
    so that the test means the same on a machine with GPUs."""
    out = tmp_path / "nogpu"
    assert main(_args(inputs, out, "--encoder-actors", "1", "--gpus-per-encoder", "1000")) == 1
    err = capsys.readouterr().err
    assert "1 encoder actors need 1000 GPU (the cluster has" in err and "this machine's Ray cannot provide it" in err
