"""What training reads from a dataset besides the samples: latent statistics and the empty prompt.

The rule (whose values the generator uses):

- **official encoders** (``dataset.json`` ``extra.encoders_family == "official"``): the official
  checkpoint's values win. ``latent_mean``/``latent_std``/``empty_string_feat`` are parameters of the
  released generator, trained with; replacing them by statistics of another training set would shift
  the latent scale under pretrained weights. The generator must already hold them (loaded with
  ``selva.weights.load_generator``): its constructor's placeholders are refused.
- **embedded encoders**: no checkpoint knows this codec or text encoder, so the dataset's values are
  set: the train split's latent statistics and the CLIP-slot features of "" (``selva.data_statistics``).

The DeepSpeed trainer calls :func:`configure_generator` once, after loading weights, before step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preprocessing.prompt_store import EmptyPrompt, read_empty_prompt
from preprocessing.shards import ShardError, read_dataset_info
from selva.data_statistics import DataStatistics, apply_data_statistics, has_default_statistics
from selva.generator import Generator

OFFICIAL = "official"


@dataclass(frozen=True)
class DatasetStatistics:
    """A dataset's training constants: ``latent_mean``/``latent_std`` (D,) float64 of the train split,
    the empty prompt's features, and the encoder family that made them."""

    family: str
    latent_mean: np.ndarray
    latent_std: np.ndarray
    frames: int
    empty: EmptyPrompt

    def for_generator(self) -> DataStatistics:
        return DataStatistics(
            latent_mean=torch.from_numpy(self.latent_mean),
            latent_std=torch.from_numpy(self.latent_std),
            empty_text=torch.from_numpy(self.empty.clip_text.astype(np.float32)),
        )


def read_dataset_statistics(dataset_dir: str | Path) -> DatasetStatistics:
    """Read ``latent_stats`` and the empty-prompt files named in ``dataset.json``; a clear error when absent."""
    info = read_dataset_info(dataset_dir)
    stats = info.latent_stats
    if not stats:
        raise ShardError(
            f"{dataset_dir}/dataset.json has no latent statistics: the precompute job has not finished, the "
            f"dataset has no train samples, or it was written before statistics were recorded (rerun "
            f"`selva precompute` on it, or rebuild it with a new --out)"
        )
    if not info.empty_prompt:
        raise ShardError(
            f"{dataset_dir}/dataset.json names no empty-prompt features (written before they were recorded?); "
            f"rebuild the dataset with a new --out"
        )
    return DatasetStatistics(
        family=str(info.extra.get("encoders_family", "embedded")),
        latent_mean=np.asarray(stats["mean"], np.float64),
        latent_std=np.asarray(stats["std"], np.float64),
        frames=int(stats["frames"]),
        empty=read_empty_prompt(dataset_dir, info.empty_prompt),
    )


def configure_generator(generator: Generator, dataset_dir: str | Path) -> str:
    """Apply the rule above to ``generator`` (in place); returns where its values come from,
    ``"checkpoint"`` or ``"dataset"``, for the run's log."""
    info = read_dataset_info(dataset_dir)
    if info.extra.get("encoders_family") == OFFICIAL:
        if has_default_statistics(generator):
            raise ValueError(
                f"{dataset_dir} was made with the official encoders, whose latent statistics and empty-prompt "
                f"features are parameters of the released generator; load its checkpoint first "
                f"(selva.weights.load_generator)"
            )
        return "checkpoint"
    apply_data_statistics(generator, read_dataset_statistics(dataset_dir).for_generator())
    return "dataset"
