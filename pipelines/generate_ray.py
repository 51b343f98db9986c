"""``selva generate --manifest ... --ray-workers N``: the list split over N Ray workers.

Worker i of N does what rank i of N does under ``torchrun`` (``training.generate_batch.run_items``
with ``rank=i, world_size=N``): every N-th item of the list, skipping finished ones, recording
failures. Each worker loads the checkpoint once and holds one CPU (or one GPU with ``--gpus-per-worker``).
With ``RAY_ADDRESS`` set the workers run on that cluster (the output folder must be shared storage);
otherwise a private local Ray with N CPUs starts. A worker that dies is not retried here: rerun the
command, which skips every finished item.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import ray


def _work(checkpoint: str, weights: str | None, device: str, items: list, out: str, steps: int, cfg: float,
          seed: int, batch_size: int, rank: int, world: int, preset: str | None = None) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from training.generate import load_model
    from training.generate_batch import run_items

    hf_logging.disable_progress_bar()
    model = load_model(checkpoint, weights=weights, device=device, preset=preset)
    report = run_items(model, items, out, steps=steps, cfg=cfg, seed=seed, batch_size=batch_size, rank=rank,
                       world_size=world)
    return {"done_before": report.done_before, "generated": report.generated, "failed": dict(report.failed),
            "failures": report.failures}


def run_on_ray(checkpoint: Path, weights: Path | None, items: list, out: Path, *, workers: int, steps: int,
               cfg: float, seed: int, batch_size: int, gpus_per_worker: float = 0.0,
               preset: str | None = None) -> dict[str, Any]:
    """Run the list on ``workers`` Ray tasks and merge their reports."""
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # a private Ray, never another user's head on this machine (pipelines/ray_runner.init_ray)
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=True,
                     logging_level="WARNING")
    device = "cuda" if gpus_per_worker else "cpu"
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_retries=0)(_work)
    pending = [task.remote(str(checkpoint), str(weights) if weights else None, device, items, str(out), steps, cfg,
                           seed, batch_size, rank, workers, preset) for rank in range(workers)]
    merged: dict[str, Any] = {"done_before": 0, "generated": 0, "failed": Counter(), "failures": []}
    for report in ray.get(pending):
        merged["done_before"] += report["done_before"]
        merged["generated"] += report["generated"]
        merged["failed"].update(report["failed"])
        merged["failures"] += report["failures"]
    return merged
