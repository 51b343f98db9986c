"""training/tracking.py against real outages (a closed port, a server that accepts and never
answers) and a real MLflow store (sqlite). No test sets an MLFLOW_* variable: the short timeouts
and the low retry count must come from the tracker itself."""

from __future__ import annotations

import os
import threading
import time

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
