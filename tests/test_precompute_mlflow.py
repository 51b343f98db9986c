"""`selva precompute --mlflow` logs params and metrics to a real MLflow store (sqlite)."""

from __future__ import annotations

from collections import Counter

from pipelines.precompute import PrecomputeConfig, PrecomputeReport
from pipelines.precompute_cli import log_to_mlflow


def test_precompute_run_is_logged_to_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = PrecomputeConfig(input="clips.tsv", out=str(tmp_path / "dataset"), workers=2)
    (tmp_path / "dataset").mkdir()
    report = PrecomputeReport(ok=7, failed=2, failures_by_reason=Counter({"silent": 2}),
                              timings=Counter({"decode": 1.5}), shards_run=["train-000000"])
    log_to_mlflow(cfg, report)

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'dataset' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("selva-precompute")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["workers"] == "2"
    assert run.data.metrics["clips_ok"] == 7 and run.data.metrics["failed_silent"] == 2
    assert run.data.metrics["time_decode_s"] == 1.5


def test_a_tracking_outage_never_fails_the_job(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = PrecomputeConfig(input="clips.tsv", out=str(tmp_path))
    log_to_mlflow(cfg, PrecomputeReport())
    assert "MLflow logging failed" in capsys.readouterr().err
