"""The trainer's modules: a preset's TextSynch and generator, their initial weights, their EMA.

Initial weights (``init.*``, DESIGN §4): stage 1 starts from Synchformer's backbone
(``init.backbone``) and MMAudio's generator (``init.generator``); stage 2 from stage 1's TextSynch
(``init.textsynch``, our ``final/`` export) and MMAudio's generator. Each path may be one of our
exports or an official file/folder (training/export.py reads both). Without one, a module keeps the
preset's fresh initialisation (the ``tiny`` preset's ``pretrain`` stage makes the weights the later
stages start from).

The generator's latent statistics and empty-prompt features follow the dataset rule of
training/dataset_stats.py (official encoders: the checkpoint's; embedded: the dataset's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from selva.generator import Generator
from selva.presets import get_preset
from selva.textsynch import TextSynch
from selva.weights import load_synchformer_backbone
from training.dataset_stats import configure_generator
from training.train_config import TrainConfig


@dataclass
class Models:
    textsynch: TextSynch
    generator: Generator
    statistics_from: str  # "checkpoint" or "dataset"


def build_models(cfg: TrainConfig) -> Models:
    """Build the preset's modules (call after seeding: the fresh init must be equal on every rank)."""
    from training.export import load_module_init

    preset = get_preset(cfg.preset)
    textsynch = load_module_init("textsynch", cfg.init.textsynch, preset) if cfg.init.textsynch \
        else preset.build_textsynch()
    generator = load_module_init("generator", cfg.init.generator, preset) if cfg.init.generator \
        else preset.build_generator()
    if cfg.init.backbone:
        load_synchformer_backbone(textsynch, cfg.init.backbone)
    source = configure_generator(generator, cfg.dataset[0].path)
    return Models(textsynch, generator, source)


class EMA:
    """Post-hoc EMA of the stage's trained parameters (training/ema.py), on rank 0 only: ZeRO-1/2 keeps
    the full, identical weights on every rank, and the snapshot folder is shared."""

    def __init__(self, cfg: TrainConfig, models: Models, trained_names: list[str], snapshots_dir: Path):
        from training.ema import EMAConfig, PostHocEMATracker

        e = cfg.ema
        self.config = EMAConfig(sigma_rels=tuple(e.sigma_rels), update_every=e.update_every,
                                snapshot_every=e.snapshot_every, export_sigma_rel=e.export_sigma_rel)
        self.holder = nn.ModuleDict({"textsynch": models.textsynch, "generator": models.generator})
        self.tracker = PostHocEMATracker(self.holder, self.config, snapshots_dir, param_names=trained_names)

    def update(self, step: int) -> None:
        self.tracker.update(step)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.tracker.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: Path, step: int) -> None:
        self.tracker.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if self.tracker.step != step:
            raise RuntimeError(f"{path}: EMA state is at step {self.tracker.step}, the checkpoint at {step}")

    def export_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """The synthesised ``export_sigma_rel`` weights, split per module: {"textsynch": {...}, "generator": {...}}."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.tracker.synthesize(self.config.export_sigma_rel).items():
            module, _, key = name.partition(".")
            out.setdefault(module, {})[key] = tensor
        return out


def ema_module(cfg: TrainConfig, models: Models, trained_names: list[str], snapshots_dir: Path) -> EMA:
    return EMA(cfg, models, trained_names, snapshots_dir)
