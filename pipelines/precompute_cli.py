"""``selva precompute``: argument parsing, the final report, optional MLflow tracking (never blocking)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipelines.precompute import (
    PrecomputeConfig,
    PrecomputeError,
    PrecomputeReport,
    as_params,
    config_from_args,
    resolved,
)
from preprocessing.shards import DATASET_JSON
from selva.presets import PRESETS
from training.tracking import Tracker, TrackingConfig, default_uri

EXPERIMENT = "selva-precompute"
TRACKING_DEADLINE_S = 10.0  # the most a finished job waits for its tracking at exit

DESCRIPTION = """\
Decode every clip of an input table once, run the frozen encoders, and write WebDataset shards.

On a laptop this starts a private local Ray with --workers CPUs (plus the encoder actors' with
--encoder-actors). With RAY_ADDRESS set (or under `ray job submit`) the same command runs on a Ray
cluster. Two designs: the one-stage pool (default: each worker decodes and encodes its shards)
and, with --encoder-actors G, CPU decode tasks feeding G encoder actors (one per GPU;
docs/cluster.md). Rerunning the same command resumes: only shards without a done-marker are
written. Bad clips are recorded in failures/*.parquet with a reason and never stop the job; a
shard whose failure share exceeds --max-failed-fraction does.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "precompute", help="clips -> WebDataset shards with frozen-encoder features (Ray)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="TSV/CSV/Parquet with id and label|caption (VGGSound lists as-is)")
    p.add_argument("--media-root", dest="media_root", help="folder of <id>.mp4 files (default: the table's folder)")
    p.add_argument("--out", required=True, help="dataset folder to create or resume")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="model preset (default tiny); its clip length, frame size and audio rate (16 or 44.1 kHz) "
                        "shape the dataset: small/medium/large_44k share one")
    p.add_argument("--encoders", default="embedded", choices=["embedded", "official"],
                   help="frozen encoder family (default embedded: no downloads)")
    p.add_argument("--weights", help="official weights folder (docs/weights.md); needed with --encoders official")
    p.add_argument("--samples-per-shard", dest="samples_per_shard", type=int, default=64)
    p.add_argument("--workers", type=int, default=2,
                   help="one-stage: shard workers, one CPU each; with --encoder-actors: decode tasks at once "
                        "(default 2)")
    p.add_argument("--gpus-per-worker", dest="gpus_per_worker", type=float, default=0.0,
                   help="one-stage: GPUs per worker, e.g. 1 or 0.5 (default 0: CPU)")
    p.add_argument("--encoder-actors", dest="encoder_actors", type=int, default=0,
                   help="two-stage design: this many encoder actors (one per GPU on a GPU node) fed by --workers "
                        "CPU decode tasks; 0 (default): the one-stage pool (docs/cluster.md)")
    p.add_argument("--gpus-per-encoder", dest="gpus_per_encoder", type=float, default=0.0,
                   help="GPUs per encoder actor (default 0: CPU encoders)")
    p.add_argument("--encoder-resource", dest="encoder_resource", default=None, metavar="NAME",
                   help="a custom Ray resource each encoder actor takes one unit of (nodes that declare it host "
                        "the encoders; a local Ray declares --encoder-actors units of it)")
    p.add_argument("--encoder-cpus", dest="encoder_cpus", type=float, default=1.0,
                   help="CPUs each encoder actor holds (default 1)")
    p.add_argument("--retry-failed", dest="retry_failed", action="store_true",
                   help="re-attempt only the clips recorded as failed, keeping every written sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the shard assignment")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="encoder batch size")
    p.add_argument("--max-failed-fraction", dest="max_failed_fraction", type=float, default=0.5,
                   help="a shard with a larger share of failed clips stops the job (default 0.5)")
    p.add_argument("--io-timeout", dest="io_timeout_s", type=float, default=30.0,
                   help="seconds a media URL may leave a read waiting before it counts as a storage fault "
                        "(retried, then the shard fails; default 30)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--mlflow", action="store_true",
                   help="log the run to MLflow (MLFLOW_TRACKING_URI, else sqlite in the dataset folder); "
                        "a slow or dead server never blocks the job (docs/precompute.md#tracking)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.encoders == "official":
        from selva.weights import PRECOMPUTE_ROLES, MissingWeightsError, require

        if not PRESETS[cfg.preset].released:
            print(f"error: preset {cfg.preset} is not a released size: the official encoders do not fit its widths; "
                  f"use --encoders embedded, or small_16k / small_44k / medium_44k / large_44k", file=sys.stderr)
            return 2
        try:  # before any work: a missing file is named now, not after an hour of decoding
            require(cfg.weights, PRECOMPUTE_ROLES, cfg.preset)
        except MissingWeightsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from pipelines.precompute import run_precompute

    tracker = start_tracking(cfg) if args.mlflow else None
    try:
        report = run_precompute(cfg)
    except PrecomputeError as err:
        print(f"error: {err}", file=sys.stderr)
        if (Path(cfg.out) / DATASET_JSON).exists():  # past the manifest step: shards may be done
            print("finished shards are kept; rerun the same command to resume", file=sys.stderr)
        finish_tracking(tracker, "FAILED")
        return 1
    except BaseException as err:  # an expected error main() reports, a bug, or Ctrl-C: the run is ended too
        finish_tracking(tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    print(report.table())
    if tracker is not None:
        tracker.log_metrics(report_metrics(report))
        finish_tracking(tracker, "FINISHED")
    return 0


def start_tracking(cfg: PrecomputeConfig) -> Tracker:
    """Start the MLflow run now (params); nothing here waits for the tracking server."""
    cfg = resolved(cfg)  # params as the job used them: absolute paths, not the shell's relative ones
    uri = default_uri(cfg.out)
    # with the default sqlite store in the dataset folder, artifacts go beside it, not to ./mlruns
    artifacts = (Path(cfg.out) / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    tracker = Tracker(TrackingConfig(uri=uri, artifact_location=artifacts))
    tracker.start_run(EXPERIMENT, f"precompute {Path(cfg.out).name}", params=as_params(cfg))
    return tracker


def report_metrics(report: PrecomputeReport) -> dict[str, float]:
    metrics = {"clips_ok": report.ok, "clips_failed": report.failed, "shards_written": len(report.shards_run),
               "ray_start_s": report.ray_start_seconds, "run_s": report.run_seconds}
    metrics.update({f"failed_{k}": v for k, v in report.failures_by_reason.items()})
    metrics.update({f"time_{k}_s": v for k, v in report.timings.items()})
    return metrics


def finish_tracking(tracker: Tracker | None, status: str) -> None:
    """End the run, waiting at most TRACKING_DEADLINE_S; one line says what could not be sent."""
    if tracker is None:
        return
    summary = tracker.close(TRACKING_DEADLINE_S, status)
    problem = summary.problem(TRACKING_DEADLINE_S)
    if problem:
        print(f"warning: {problem}; the dataset is not affected", file=sys.stderr)
    else:
        print(f"logged to MLflow at {summary.uri} (run {summary.run_id})")
