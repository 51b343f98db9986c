"""`selva precompute --mlflow`: what it logs to a real MLflow store (sqlite), and what a dead server
costs (one line each, never a traceback). No test sets an MLflow variable other than the URI."""

from __future__ import annotations

import os
import threading
from collections import Counter

import pytest
from tracking_servers import closed_port, no_mlflow_env

from pipelines.precompute import PrecomputeConfig, PrecomputeReport
from pipelines.precompute_cli import EXPERIMENT, finish_tracking, report_metrics, start_tracking


@pytest.fixture(autouse=True)
def clean_env():
    with no_mlflow_env():
        yield


def test_precompute_run_is_logged_to_sqlite(tmp_path):
    cfg = PrecomputeConfig(input="clips.tsv", out=str(tmp_path / "dataset"), workers=2)  # not created yet
    report = PrecomputeReport(ok=7, failed=2, failures_by_reason=Counter({"silent": 2}),
                              timings=Counter({"decode": 1.5}), shards_run=["train-000000"])
    tracker = start_tracking(cfg)
    tracker.log_metrics(report_metrics(report))
    summary = tracker.close(deadline_s=60)  # a first sqlite store takes seconds to create: not under test here
    assert summary.finished and summary.dropped == 0
    assert threading.get_ident() not in tracker.mlflow_thread_ids

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'dataset' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "precompute dataset" and run.info.status == "FINISHED"
    assert run.data.params["workers"] == "2"
    assert run.data.metrics["clips_ok"] == 7 and run.data.metrics["failed_silent"] == 2
    assert run.data.metrics["time_decode_s"] == 1.5 and run.data.metrics["shards_written"] == 1
    # paths as the job used them, and the artifacts beside the store, not in the shell's ./mlruns
    assert run.data.params["input"] == os.path.abspath("clips.tsv")
    assert run.data.params["out"] == str(tmp_path / "dataset")
    assert run.info.artifact_uri.startswith((tmp_path / "dataset" / "mlartifacts").as_uri())


def test_a_dead_server_is_one_warning_and_one_count(tmp_path, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the clean_env fixture removes it again
    tracker = start_tracking(PrecomputeConfig(input="clips.tsv", out=str(tmp_path)))
    assert tracker.failed.wait(30)  # the job is still running when the server is found dead
    tracker.log_metrics(report_metrics(PrecomputeReport()))
    finish_tracking(tracker, "FINISHED")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    failed, count = err.splitlines()
    assert failed.startswith(f"warning: MLflow tracking at {uri} failed (ConnectionRefusedError")
    assert count.startswith(f"warning: MLflow tracking at {uri}: ") and "values not sent" in count
    assert count.endswith("the dataset is not affected")
