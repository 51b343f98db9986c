"""Entry point of a training job: ``python -m training.train --config FILE [key=value ...]``.

The same module serves every launcher, unchanged: ``selva train`` (one process), ``torchrun -m
training.train``, ``deepspeed --module training.train`` (hostfile) and ``srun python -m
training.train`` under Slurm (docs/training.md). Order of work, so that mistakes cost seconds:

1. resolve and check the config, check the datasets against the preset (no process group yet);
2. join the process group; build modules, engine and loader; pick the checkpoint to resume (rank 0
   decides, every rank gets the same answer or the same refusal);
3. rank 0 starts the MLflow run (resuming: the same run) through the non-blocking tracker;
4. train (training/trainer.py); export ``final/`` (EMA weights) on rank 0; close the tracker within
   its deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from training.stop_signal import install_signal_handlers
from training.train_config import ConfigError, TrainConfig, flatten, load_config, redact, to_dict, to_yaml

TRACKING_CLOSE_S = 10.0  # the exit flush waits at most this long for a tracking server
JOB_TAG = "selva_job"  # the MLflow tag naming a training job across resumes (Trainer.job_id)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="YAML config (configs/train/*.yaml); defaults apply without one")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (credentials redacted) and exit")
    # the deepspeed launcher appends --local_rank=N (unless --no_local_rank); LOCAL_RANK says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. dataset=DIR out=DIR stage=encoder steps=200 optim.lr=3e-4 resume=auto")
    return parser


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_tracking(cfg: TrainConfig, trainer: Any, world: Any) -> Any:
    """Rank 0's tracker, started on the run to continue (resume) or a new one; None elsewhere."""
    nodes = trainer.count_nodes()  # a collective: every rank takes part
    if not world.is_main:
        return None
    from training.tracking import Tracker, TrackingConfig
    from training.train_data import dataset_profile

    out = Path(cfg.out)
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve() / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(uri=uri, artifact_location=str((out / "mlartifacts").resolve())))
    tags = {
        "git_commit": git_commit(), "dataset_fingerprint": trainer.dataset_fp, "world_size": world.world_size,
        "nodes": nodes, "stage": cfg.stage, "preset": cfg.preset,
        "deepspeed_config": json.dumps(trainer.resolved()["deepspeed"], sort_keys=True), JOB_TAG: trainer.job_id,
    }
    name = cfg.run_name or f"{cfg.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker.start_run(cfg.experiment, name, params=flatten(to_dict(cfg)), tags=tags, run_id=trainer.run_id,
                      job=(JOB_TAG, trainer.job_id))
    for entry in cfg.dataset:
        tracker.log_input(Path(entry.path).name, trainer.dataset_fp, str(Path(entry.path).resolve()),
                          profile=dataset_profile(cfg))
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "resolved_config.yaml"
    resolved.write_text(to_yaml(cfg))
    (out / "deepspeed_config.json").write_text(json.dumps(trainer.resolved()["deepspeed"], indent=1))
    tracker.log_artifact(str(resolved))
    tracker.log_artifact(str(out / "deepspeed_config.json"))
    return tracker


def run(cfg: TrainConfig) -> int:
    """Train with a resolved config in this process (one rank of the job). Returns the exit code."""
    import torch.distributed as dist

    from training.engine import init_world
    from training.progress import Progress, print_summary
    from training.train_data import dataset_fingerprint, preflight
    from training.trainer import Trainer, TrainingStopped, find_resume

    preflight(cfg)
    world = init_world(cfg)
    tracker = None
    status = "FAILED"
    try:
        dataset_fp = dataset_fingerprint(cfg)
        found = find_resume(cfg, world, dataset_fp)
        trainer = Trainer(cfg, world, dataset_fp=dataset_fp)
        if found is not None:
            trainer.load_checkpoint(found)
            if world.is_main:
                print(f"resuming from {found.folder} (step {found.step})", file=sys.stderr, flush=True)
        tracker = start_tracking(cfg, trainer, world)
        trainer.tracker = tracker
        progress = Progress(cfg.steps, trainer.step, enabled=world.is_main)
        try:
            summary = trainer.run(on_step=progress.update, on_log=progress.log)
        finally:
            progress.close()
        if summary.get("signal"):
            status = "KILLED"
            return 0
        if world.is_main:
            final = trainer.export()
            if tracker is not None:
                tracker.log_artifact(str(final))
            print_summary(trainer, summary, final)
        status = "FINISHED"
        return 0
    except TrainingStopped as err:
        if world.is_main:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if tracker is not None:
            result = tracker.close(TRACKING_CLOSE_S, status=status)
            problem = result.problem(TRACKING_CLOSE_S)
            if problem and not tracker.warned:  # one warning per job: the tracker's own, or this summary
                print(f"warning: {problem}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    install_signal_handlers()  # first: a pre-emption signal during start-up (imports take seconds) is kept
    args = build_parser().parse_args(argv)
    from selva.checkpoint import CheckpointError
    from training.checkpoints import ResumeError
    from training.export import ExportPathError

    try:
        cfg = load_config(args.config, args.overrides, need_paths=not args.print_config)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        return run(cfg)
    except (ConfigError, ResumeError) as err:
        if os.environ.get("RANK", "0") == "0":  # every rank refuses alike; one of them says why
            print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    except (CheckpointError, ExportPathError) as err:  # an init.* file the preflight's cheap check let through
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    # Everything is written and closed by now. Interpreter shutdown would still walk the millions of
    # objects torch, DeepSpeed and MLflow leave behind (3-4 s per rank on a CPU, measured); frozen
    # objects are skipped by that final collection. Files and atexit handlers are unaffected.
    import gc

    gc.freeze()
    sys.exit(code)
