"""The console side of training: a progress bar on rank 0 and the end-of-run table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


class Progress:
    """``step/steps`` with loss, samples/s and ETA (tqdm), on rank 0 only; a no-op elsewhere."""

    def __init__(self, steps: int, start: int, *, enabled: bool):
        self.bar = None
        self.postfix: dict[str, str] = {}
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.postfix["loss"] = f"{loss:.4f}"
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(step - self.bar.n)

    def log(self, step: int, metrics: dict[str, float]) -> None:  # noqa: ARG002 - callback signature
        if self.bar is not None:
            self.postfix["samples/s"] = f"{metrics['train/samples_per_s']:.1f}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(trainer: Any, summary: dict[str, Any], final: Path) -> None:
    """The end-of-run table (stdout): what ran, how fast, where the results are."""
    losses = [x for x in trainer.losses if x == x]
    n = max(1, min(10, len(losses) // 2))  # first and last n steps never overlap
    first = sum(losses[:n]) / n if losses else float("nan")
    last = sum(losses[-n:]) / n if losses else float("nan")
    rows = [
        ("stage", trainer.cfg.stage),
        ("steps (this job)", f"{summary.get('steps', 0)} of {trainer.cfg.steps}"),
        (f"loss (first {n} -> last {n} steps)", f"{first:.4f} -> {last:.4f}"),
        ("skipped steps (non-finite)", str(trainer.skipped)),
        ("val loss (last validation)", f"{trainer.val_metrics['val/loss']:.4f}" if trainer.val_metrics.get("val/loss")
         is not None else "-"),
        ("world size", str(trainer.world.world_size)),
        ("time", f"{summary.get('elapsed_s', 0.0):.1f} s"),
        ("checkpoints", str(trainer.ckpt_root)),
        ("final weights", str(final)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)
