"""training/tracking.py against real outages (a closed port, a server that accepts and never
answers) and a real MLflow store (sqlite). No test sets an MLFLOW_* variable: the short timeouts
and the low retry count must come from the tracker itself."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from tracking_servers import closed_port, no_mlflow_env, record_http_calls, silent_server

from training.tracking import RETRIES_ENV, TIMEOUT_ENV, Tracker, TrackingConfig

CEILING_S = 30.0  # the loose bound for a job facing a tracking outage
# scheduling slack past a deadline on a loaded 2-core machine; the defect guarded against costs minutes
SLACK_S = 5.0
STEPS = 100


@pytest.fixture(autouse=True)
def clean_env():
    with no_mlflow_env():
        yield


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_a_closed_port_costs_the_job_nothing(monkeypatch, capsys):
    began = time.monotonic()
    calls = record_http_calls(monkeypatch)
    uri = f"http://127.0.0.1:{closed_port()}"
    job = threading.get_ident()
    tracker = Tracker(TrackingConfig(uri=uri))
    tracker.start_run("selva-test", "closed port", params={"workers": 2})
    assert tracker.failed.wait(CEILING_S)  # the tracker's thread has tried the server, and warned
    for step in range(STEPS):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)

    deadline = 5.0
    t0 = time.monotonic()
    summary = tracker.close(deadline_s=deadline)
    assert time.monotonic() - t0 < deadline + SLACK_S

    assert calls.threads and job not in calls.threads  # every request ran on the tracker's thread
    assert tracker.mlflow_thread_ids and job not in tracker.mlflow_thread_ids
    # one refused request opened the circuit: later events were dropped without a request each,
    # and that request failed at once (MLflow's own default is 7 retries, minutes of backoff)
    assert len(calls.threads) == 1
    assert summary.finished and summary.run_id is None
    assert summary.sent == 0 and summary.dropped == STEPS + 1  # the metrics and the one param
    assert "Connection refused" in summary.error
    (line,) = _warnings(capsys.readouterr().err)  # warned once, on one line, naming URI and error
    assert uri in line and "Connection refused" in line
    t0 = time.monotonic()  # the thread has ended without a run: nothing left to wait for
    assert tracker.wait_run_id(CEILING_S) is None and time.monotonic() - t0 < SLACK_S
    assert time.monotonic() - began < CEILING_S


def test_a_server_that_never_answers_costs_the_job_only_the_close_deadline(monkeypatch, capsys):
    began = time.monotonic()
    calls = record_http_calls(monkeypatch)
    job = threading.get_ident()
    with silent_server() as port:
        uri = f"http://127.0.0.1:{port}"
        # a small queue, so that the stuck request also fills it; a 3 s timeout (not the default 5)
        # keeps the test short and still leaves the job's thread 6 s to fill the queue first
        tracker = Tracker(TrackingConfig(uri=uri, queue_size=10, request_timeout_s=3))
        tracker.start_run("selva-test", "silent server", params={"workers": 2})
        assert calls.started.wait(CEILING_S)  # the request is now waiting for an answer
        for step in range(STEPS):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        (line,) = _warnings(capsys.readouterr().err)  # the overflow, once, from the job's thread
        assert uri in line and "queue of 10 events is full" in line

        deadline = 2.0
        t0 = time.monotonic()
        summary = tracker.close(deadline_s=deadline)
        took = time.monotonic() - t0
        assert deadline - 0.05 <= took < deadline + SLACK_S  # it waited for the deadline, and no longer
        assert not summary.finished and summary.sent == 0 and summary.dropped == STEPS + 1
        assert summary.problem(deadline) == (
            f"MLflow tracking at {uri}: {STEPS + 1} of {STEPS + 1} values not sent "
            f"(still pending at the {deadline:g} s deadline)"
        )

        # the hung request ends by MLflow's read timeout, as the tracker set it: 3 s, one retry
        assert calls.ended.wait(CEILING_S)
        assert calls.errors and "read timeout=3)" in str(calls.errors[0])
        assert os.environ[TIMEOUT_ENV] == "3" and os.environ[RETRIES_ENV] == "1"
    assert calls.threads and job not in calls.threads
    assert job not in tracker.mlflow_thread_ids
    assert _warnings(capsys.readouterr().err) == []  # silent after close
    assert time.monotonic() - began < CEILING_S


def test_a_users_mlflow_settings_win_over_the_trackers_defaults():
    os.environ[TIMEOUT_ENV] = "30"  # the clean_env fixture removes it again
    tracker = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{closed_port()}"))
    tracker.start_run("selva-test", "settings")
    assert os.environ[TIMEOUT_ENV] == "30" and os.environ[RETRIES_ENV] == "1"
    tracker.close(deadline_s=0)


def test_everything_reaches_a_working_store_in_batches(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    batches: list[tuple[int, int]] = []  # (thread, values) per log_batch call
    real = MlflowClient.log_batch

    def observed(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        batches.append((threading.get_ident(), len(metrics) + len(params) + len(tags)))
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", observed)
    uri = f"sqlite:///{tmp_path / 'new folder' / 'mlflow.db'}"  # a folder that does not exist yet
    tracker = Tracker(TrackingConfig(uri=uri))
    params = {f"p{i}": i for i in range(150)}  # over one request's 100-param limit
    tracker.start_run("selva-test", "sqlite", params=params, tags={"stage": "1"})
    for step in range(3):
        tracker.log_metrics({f"m{i}": step * i for i in range(500)}, step=step)
    tracker.set_tags({"done": "yes"})
    summary = tracker.close(deadline_s=CEILING_S)

    assert summary.finished and summary.dropped == 0 and summary.sent == 150 + 1 + 1500 + 1
    assert all(n <= 1000 for _, n in batches) and sum(n for _, n in batches) == summary.sent
    assert threading.get_ident() not in {thread for thread, _ in batches}
    run = MlflowClient(uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "sqlite"
    assert run.data.params["p149"] == "149" and run.data.tags["stage"] == "1" and run.data.tags["done"] == "yes"
    assert run.data.metrics["m499"] == 2 * 499  # the last step's value
    history = MlflowClient(uri).get_metric_history(summary.run_id, "m7")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 7.0), (2, 14.0)]


def _sqlite(tmp_path, **kwargs) -> TrackingConfig:
    # artifacts in tmp_path too: a sqlite store's default artifact root is ./mlruns in the cwd
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          artifact_location=str(tmp_path / "artifacts"), **kwargs)


def test_a_job_stopped_before_it_learned_its_run_id_continues_the_run_by_its_tag(tmp_path):
    """A loaded machine: the first part of a job checkpointed and stopped before its tracker had created
    the run, so no checkpoint holds the id. Resumed, the job finds its run by the job tag: one run."""
    from mlflow.tracking import MlflowClient

    config = _sqlite(tmp_path)
    first = Tracker(config)
    first.start_run("selva-test", "job", tags={"selva_job": "abc"}, job=("selva_job", "abc"))
    first.log_metrics({"loss": 1.0}, step=1)
    run_id = first.close(deadline_s=CEILING_S).run_id
    other = Tracker(config)  # another job in the same experiment: its own run
    other.start_run("selva-test", "other", tags={"selva_job": "xyz"}, job=("selva_job", "xyz"))
    assert other.close(deadline_s=CEILING_S).run_id != run_id
    second = Tracker(config)
    second.start_run("selva-test", "job", tags={"selva_job": "abc"}, job=("selva_job", "abc"))  # no run_id
    second.log_metrics({"loss": 0.5}, step=2)
    assert second.close(deadline_s=CEILING_S).run_id == run_id
    client = MlflowClient(config.uri)
    runs = client.search_runs([client.get_experiment_by_name("selva-test").experiment_id])
    assert len(runs) == 2
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]


def test_a_resumed_job_continues_its_run_by_id(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    config = _sqlite(tmp_path)
    first = Tracker(config)
    assert first.run_id is None  # nothing created before start_run
    first.start_run("selva-test", "resumable", params={"lr": 0.1, "workers": 2})
    run_id = first.wait_run_id(CEILING_S)
    assert run_id is not None and first.run_id == run_id
    for step in range(2):
        first.log_metrics({"loss": 10.0 - step}, step=step)
    assert first.close(deadline_s=CEILING_S).dropped == 0

    client = MlflowClient(config.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    second = Tracker(config)
    # lr unchanged, workers changed (MLflow would refuse it), resumed_from new
    second.start_run("selva-test", "ignored when continuing", run_id=run_id,
                     params={"lr": 0.1, "workers": 4, "resumed_from": "step-1"})
    assert second.wait_run_id(CEILING_S) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(2, 4):
        second.log_metrics({"loss": 10.0 - step}, step=step)
    second.log_params({"workers": 8})  # changed again, after the run was adopted: no second warning
    summary = second.close(deadline_s=CEILING_S)

    assert summary.finished and summary.run_id == run_id
    assert summary.sent == 2 + 2 and summary.dropped == 2  # lr (held already) + resumed_from, 2 losses
    assert "workers (logged '2', now '4')" in summary.error
    (line,) = _warnings(capsys.readouterr().err)
    assert line == (f"warning: MLflow tracking at {config.uri} did not log changed params "
                    "(MLflow keeps a run's first value): workers (logged '2', now '4')")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "resumable"
    assert run.data.params == {"lr": "0.1", "workers": "2", "resumed_from": "step-1"}
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0)]
    experiment = client.get_experiment_by_name("selva-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]


def test_a_run_id_the_store_does_not_hold_starts_a_new_run_that_says_so(tmp_path, capsys):
    """A resume against another store (or from a checkpoint copied from another run) once lost all of
    the job's tracking: every call failed with "Run ... not found"."""
    from mlflow.tracking import MlflowClient

    config = _sqlite(tmp_path)
    gone = "0123456789abcdef0123456789abcdef"
    tracker = Tracker(config)
    tracker.start_run("selva-test", "resumed elsewhere", params={"lr": 0.1}, run_id=gone)
    run_id = tracker.wait_run_id(CEILING_S)
    assert run_id is not None and run_id != gone
    for step in range(3):
        tracker.log_metrics({"loss": 3.0 - step}, step=step)
    summary = tracker.close(deadline_s=CEILING_S)
    assert summary.finished and summary.run_id == run_id and summary.dropped == 0
    (line,) = _warnings(capsys.readouterr().err)
    assert f"has no run {gone} to continue" in line and f"logging to a new run {run_id}" in line
    run = MlflowClient(config.uri).get_run(run_id)
    assert run.info.run_name == "resumed elsewhere" and run.info.status == "FINISHED"
    assert run.data.tags["continues_run"] == gone and run.data.params == {"lr": "0.1"}
    assert [m.value for m in MlflowClient(config.uri).get_metric_history(run_id, "loss")] == [3.0, 2.0, 1.0]


def test_wait_run_id_gives_up_at_its_deadline_against_a_silent_server(monkeypatch):
    calls = record_http_calls(monkeypatch)
    job = threading.get_ident()
    with silent_server() as port:
        tracker = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{port}", request_timeout_s=3))
        tracker.start_run("selva-test", "silent server")
        assert calls.started.wait(CEILING_S)  # the run's creation is waiting for an answer
        timeout = 1.0
        t0 = time.monotonic()
        assert tracker.wait_run_id(timeout) is None
        took = time.monotonic() - t0
        assert timeout - 0.05 <= took < timeout + SLACK_S
        assert tracker.run_id is None
        summary = tracker.close(deadline_s=0)
    assert not summary.finished and summary.run_id is None
    assert calls.threads and job not in calls.threads
    assert job not in tracker.mlflow_thread_ids


def test_artifacts_a_file_and_a_folder_are_uploaded_and_counted_per_file(tmp_path):
    from mlflow.tracking import MlflowClient

    config_file = tmp_path / "job" / "config.yaml"
    folder = tmp_path / "job" / "eval"
    (folder / "sub").mkdir(parents=True)
    config_file.write_text("lr: 0.1\n")
    (folder / "a.txt").write_text("first")
    (folder / "sub" / "b.txt").write_text("second")

    config = _sqlite(tmp_path)
    tracker = Tracker(config)
    tracker.start_run("selva-test", "artifacts")
    tracker.log_artifact(config_file)
    tracker.log_artifact(str(folder), artifact_path="samples")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tracker.log_artifact(tmp_path / "missing.txt")
    summary = tracker.close(deadline_s=CEILING_S)

    assert summary.finished and summary.sent == 3 and summary.dropped == 0  # one per file
    client = MlflowClient(config.uri)
    assert {(f.path, f.is_dir) for f in client.list_artifacts(summary.run_id)} == {
        ("config.yaml", False), ("samples", True)}
    assert [f.path for f in client.list_artifacts(summary.run_id, "samples")] == ["samples/eval"]
    got = client.download_artifacts(summary.run_id, "samples/eval", str(tmp_path / "back"))
    assert sorted(str(p.relative_to(got)) for p in Path(got).rglob("*.txt")) == ["a.txt", "sub/b.txt"]
    assert (Path(got) / "a.txt").read_text() == "first" and (Path(got) / "sub" / "b.txt").read_text() == "second"
    back = client.download_artifacts(summary.run_id, "config.yaml", str(tmp_path / "back"))
    assert open(back).read() == "lr: 0.1\n"


def test_an_artifact_deleted_before_its_upload_is_skipped_without_opening_the_circuit(tmp_path, monkeypatch,
                                                                                   capsys):
    from training import tracking_client

    release = threading.Event()
    real_open = tracking_client.RunClient.open

    def held_open(self, *args):  # keeps the thread from uploading until the file is gone
        assert release.wait(CEILING_S)
        return real_open(self, *args)

    monkeypatch.setattr(tracking_client.RunClient, "open", held_open)
    doomed = tmp_path / "doomed.txt"
    doomed.write_text("x")
    tracker = Tracker(_sqlite(tmp_path))
    tracker.start_run("selva-test", "vanished")
    tracker.log_artifact(doomed)
    tracker.log_metrics({"loss": 1.0})
    doomed.unlink()
    release.set()
    err = ""  # close() silences the tracker, so wait for the warning first
    began = time.monotonic()
    while not _warnings(err) and time.monotonic() - began < CEILING_S:
        time.sleep(0.05)
        err += capsys.readouterr().err
    summary = tracker.close(deadline_s=CEILING_S)

    assert summary.finished and summary.sent == 1 and summary.dropped == 1
    assert summary.error == f"skipped artifact {doomed}: gone before its upload"
    assert not tracker.failed.is_set()  # the server was fine: the circuit stayed shut
    assert _warnings(err + capsys.readouterr().err) == [
        f"warning: MLflow tracking at {tracker.config.uri} skipped artifact {doomed}: gone before its upload"]


def test_the_dataset_is_logged_as_the_runs_input(tmp_path):
    from mlflow.tracking import MlflowClient

    config = _sqlite(tmp_path)
    tracker = Tracker(config)
    tracker.start_run("selva-test", "dataset")
    with pytest.raises(ValueError, match="digest of at most 36"):
        tracker.log_input("vggsound", "f" * 64, tmp_path / "dataset")  # a full sha256 is too long
    tracker.log_input("vggsound", "3f2a9c1d", tmp_path / "dataset", profile={"train": 120, "val": 8})
    tracker.log_input("vggsound-test", "77aa0b12", "s3://bucket/test", context="evaluation")
    summary = tracker.close(deadline_s=CEILING_S)

    assert summary.finished and summary.sent == 2 and summary.dropped == 0
    inputs = MlflowClient(config.uri).get_run(summary.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert sorted(by_name) == ["vggsound", "vggsound-test"]
    train, test = by_name["vggsound"], by_name["vggsound-test"]
    assert train.dataset.digest == "3f2a9c1d" and train.dataset.source_type == "local"
    assert json.loads(train.dataset.source) == {"uri": str(tmp_path / "dataset")}
    assert json.loads(train.dataset.profile) == {"train": 120, "val": 8}
    assert {t.key: t.value for t in train.tags} == {"mlflow.data.context": "training"}
    assert test.dataset.source_type == "s3" and json.loads(test.dataset.source) == {"uri": "s3://bucket/test"}
    assert test.dataset.profile is None
    assert {t.key: t.value for t in test.tags} == {"mlflow.data.context": "evaluation"}
