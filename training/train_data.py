"""The trainer's data: preflight checks of the datasets, and weighted mixing of several of them.

:func:`preflight` runs before any process group starts, so a wrong path or a dataset made for
another model fails at once with one line naming the file, instead of after minutes of start-up on
every node. :class:`WeightedBatches` interleaves the batches of several datasets: at global step
``s`` rank ``r`` takes its next batch from dataset ``i`` with probability ``weight_i / Σ weight``,
drawn from ``(seed, s, r)`` — so the choice sequence is resumable like everything else (each
dataset's own loader keeps its exact position). Mixing whole batches, not samples, keeps a batch's
tensors the same length (datasets may pad text differently) and costs nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.shards import ShardError, read_dataset_info
from selva.checkpoint import CheckpointError
from selva.presets import PRESETS, ModelPreset, get_preset
from training.export import ExportPathError, check_init_source
from training.loader import LoaderConfig, TrainLoader, build_loader
from training.shard_order import seeded_rng
from training.train_config import ConfigError, TrainConfig


def preflight(cfg: TrainConfig) -> ModelPreset:
    """Check every dataset against the preset; returns the preset. Raises ConfigError naming the file."""
    try:
        preset = get_preset(cfg.preset)
    except KeyError as err:
        raise ConfigError(f"preset: {err.args[0]}") from None
    seq = preset.seq
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; give a folder (new or an earlier run's)")
    if cfg.val_dataset and not (Path(cfg.val_dataset) / "dataset.json").is_file():
        what = "does not exist" if not Path(cfg.val_dataset).exists() else "has no dataset.json"
        raise ConfigError(f"val_dataset: {cfg.val_dataset} {what}")
    for entry in cfg.dataset:
        path = Path(entry.path)
        if not (path / "dataset.json").is_file():
            what = "does not exist" if not path.exists() else "has no dataset.json (not a `selva precompute` output)"
            raise ConfigError(f"dataset: {path} {what}")
        try:
            info = read_dataset_info(path)
        except ShardError as err:
            raise ConfigError(f"dataset: {err}") from None
        made_for = PRESETS.get(info.preset)
        # a dataset serves every preset with the same data signature (small/medium/large_44k share one)
        if made_for is None or made_for.data_signature != preset.data_signature:
            raise ConfigError(f"dataset: {path}/dataset.json was made for preset {info.preset!r}; this model is "
                              f"preset {preset.name!r} (set preset={info.preset} or precompute for {preset.name})")
        wanted = {"latent": seq.latent_seq_len, "sync_frames": int(round(seq.duration * 25))}
        for key, value in wanted.items():
            have = info.sequence_lengths.get(key)
            if have is not None and int(have) != value:
                raise ConfigError(f"dataset: {path}/dataset.json has sequence_lengths.{key} = {have}; preset "
                                  f"{preset.name} needs {value}")
        if not info.clips.get("train"):
            raise ConfigError(f"dataset: {path} has no train split")
        _check_encoders(path, info.encoders, preset)
    if len(cfg.dataset) > 1:  # mixed datasets must speak the same feature language
        first = read_dataset_info(cfg.dataset[0].path).encoders
        for entry in cfg.dataset[1:]:
            other = read_dataset_info(entry.path).encoders
            if other != first:
                raise ConfigError(f"dataset: {entry.path} was made with other encoders than {cfg.dataset[0].path} "
                                  f"({other} vs {first}); their features cannot be mixed in one model")
    for key in ("textsynch", "generator", "backbone"):
        value = getattr(cfg.init, key)
        if value and "://" not in value and not Path(value).exists():
            raise ConfigError(f"init.{key}: {value} does not exist")
        if value:
            try:
                check_init_source(key, value, preset)
            except (ExportPathError, CheckpointError) as err:
                text = str(err)  # the resolver's own message already names init.<key>=PATH
                raise ConfigError(text if text.startswith(f"init.{key}=") else f"init.{key}: {text}") from None
    return preset


def _check_encoders(path: Path, encoders: dict, preset: ModelPreset) -> None:
    """The feature widths and audio rate ``dataset.json`` records against what the preset's modules take
    (datasets written before the rate was recorded carry none, and are not checked for it)."""
    wanted = {("t5", "dim"): preset.textsynch.text_dim, ("clip_text", "dim"): preset.generator.text_dim,
              ("codec", "latent_dim"): preset.generator.latent_dim, ("codec", "sampling_rate"): preset.sampling_rate}
    for (role, field), value in wanted.items():
        have = encoders.get(role, {}).get(field)
        if have is not None and int(have) != int(value):
            raise ConfigError(f"dataset: {path}/dataset.json has encoders.{role}.{field} = {have} "
                              f"({encoders[role].get('name', '?')}); preset {preset.name} takes {value}")


def dataset_fingerprint(cfg: TrainConfig) -> str:
    """Identifies the training data (manifests and weights), not where it lies: a moved dataset resumes."""
    parts = []
    for entry in cfg.dataset:
        info = read_dataset_info(entry.path)
        parts.append([info.manifest_hash, info.clips, entry.weight])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def dataset_profile(cfg: TrainConfig) -> dict[str, Any]:
    """Sample counts per dataset and split, for the MLflow dataset input."""
    return {Path(e.path).name: read_dataset_info(e.path).clips for e in cfg.dataset}


class WeightedBatches:
    """Endless batches from one or more :class:`TrainLoader` s, chosen per step by weight."""

    def __init__(self, loaders: list[TrainLoader], weights: list[float], *, seed: int, rank: int):
        if len(loaders) != len(weights) or not loaders:
            raise ValueError("one weight per loader")
        self.loaders = loaders
        self.p = np.asarray(weights, np.float64) / float(sum(weights))
        self.seed, self.rank = seed, rank
        self.step = 0  # batches handed out
        self.taken = [0] * len(loaders)
        self._iters: list[Iterator[dict]] | None = None

    def choose(self, step: int) -> int:
        if len(self.loaders) == 1:
            return 0
        return int(seeded_rng("selva.train.datasets", self.seed, step, self.rank).choice(len(self.p), p=self.p))

    def __next__(self) -> dict:
        if self._iters is None:
            self._iters = [iter(loader) for loader in self.loaders]
        i = self.choose(self.step)
        batch = next(self._iters[i])
        self.step += 1
        self.taken[i] += 1
        return batch

    def __iter__(self) -> WeightedBatches:
        return self

    @property
    def error_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for loader in self.loaders:
            for k, v in loader.error_counts.items():
                total[k] = total.get(k, 0) + v
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "taken": list(self.taken), "loaders": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["loaders"]) != len(self.loaders):
            raise ValueError(f"loader state holds {len(state['loaders'])} datasets, this run has {len(self.loaders)}")
        for loader, s in zip(self.loaders, state["loaders"], strict=True):
            loader.load_state_dict(s)
        self.step, self.taken = int(state["step"]), [int(t) for t in state["taken"]]
        self._iters = None


def build_batches(cfg: TrainConfig, *, rank: int, world_size: int, device, mix) -> WeightedBatches:
    lc = LoaderConfig(batch_size=cfg.loader.batch_size, num_workers=cfg.loader.num_workers,
                      shuffle_buffer=cfg.loader.shuffle_buffer, seed=cfg.seed,
                      prefetch_factor=cfg.loader.prefetch_factor)
    loaders = [build_loader(e.path, lc, rank=rank, world_size=world_size, split="train", mix=mix, device=device)
               for e in cfg.dataset]
    return WeightedBatches(loaders, [e.weight for e in cfg.dataset], seed=cfg.seed, rank=rank)
