"""training/validation.py on the generated training world (tiny preset, embedded codec), single process.

The loss tests run inside a gloo process group of size 1 (the trainer always has a group, so the
all-reduce path is the one exercised); ``Validator`` also works without a group when world_size is 1
(the no-val-split and official-encoder tests run that way).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from preprocessing.compact import decode_flac
from selva.presets import TINY
from training.objective import SelvaObjective, set_stage_trainable
from training.train_config import load_config
from training.train_models import build_models
from training.validation import PNG_HOP, PNG_MELS, PNG_SCALE, T_BINS, Validator, bin_name

SAMPLES = TINY.seq.num_audio_frames  # 63 latent frames x 512 = 32256: the codec's length for 2 s (not 32000)


@pytest.fixture(scope="module")
def gloo_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _config(dataset, out, *extra):
    return load_config(None, [f"dataset={dataset}", f"out={out}", "stage=generator", "loader.batch_size=4",
                              "validation.batches=2", "validation.audio_clips=2", "validation.sampling_steps=2",
                              *extra])


@pytest.fixture(scope="module")
def world(train_world, tmp_path_factory):
    """(cfg, objective) of a fresh tiny generator-stage model; modules in train mode."""
    cfg = _config(train_world, tmp_path_factory.mktemp("val-out"))
    torch.manual_seed(0)
    models = build_models(cfg)
    set_stage_trainable(models.textsynch, models.generator, cfg.stage, pretrain_backbone=cfg.pretrain_backbone)
    objective = SelvaObjective(models.textsynch, models.generator, stage=cfg.stage, text_in_encoder=True,
                               cfg_dropout=cfg.cfg_dropout, seed=cfg.seed)
    return cfg, objective


def _validator(cfg, objective, out):
    return Validator(cfg, objective, rank=0, world_size=1, device="cpu", out_dir=out)


def test_loss_is_fixed_binned_and_leaves_training_state_alone(world, train_world, gloo_group, tmp_path):
    _, objective = world
    cfg = _config(train_world, tmp_path, "validation.audio_clips=0")
    validator = _validator(cfg, objective, tmp_path)
    cfg.validation.every, cfg.steps = 50, 120
    assert [s for s in range(1, 121) if validator.due(s)] == [50, 100, 120]
    rng = torch.get_rng_state()
    first, files = validator.run(10)
    assert torch.equal(torch.get_rng_state(), rng)
    assert files == [] and not (tmp_path / "validation").exists()
    assert all(m.training for m in (*objective.textsynch.modules(), *objective.generator.modules()))
    assert all(p.grad is None for p in objective.generator.parameters())
    assert first["val/samples"] == 8  # 2 batches of 4: the whole val split, each clip once
    bins = {k: v for k, v in first.items() if k.startswith("val/loss_t")}
    assert bins and set(bins) <= {bin_name(k) for k in range(T_BINS)}
    counts = validator.last_bin_counts
    assert sum(counts.values()) == 8
    weighted = sum(bins[k] * counts[k] for k in bins) / sum(counts.values())
    assert weighted == pytest.approx(first["val/loss"], rel=1e-9)

    torch.manual_seed(123)  # whatever the training RNG is: the same val loss
    second, _ = validator.run(20)
    assert second == first


def test_audio_files_and_spectrograms(world, train_world, tmp_path):
    _, objective = world
    cfg = _config(train_world, tmp_path, "validation.batches=0")  # audio only
    validator = _validator(cfg, objective, tmp_path)
    rng = torch.get_rng_state()
    _, files = validator.run(120)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in objective.generator.modules())
    folder = tmp_path / "validation" / "step-000120"
    assert sorted(files) == sorted(folder.iterdir())
    names = sorted(p.name for p in files)
    keys = sorted({n.split(".")[0] for n in names})
    assert len(keys) == 2
    assert names == sorted(f"{k}{ref}.{ext}" for k in keys for ref in ("", ".reference") for ext in ("flac", "png"))
    for path in files:
        if path.suffix == ".flac":
            audio, rate = decode_flac(path.read_bytes())
            assert rate == 16000 and audio.shape == (SAMPLES,) and np.isfinite(audio).all()
        else:
            with Image.open(path) as image:
                assert image.size == (PNG_SCALE * (SAMPLES // PNG_HOP + 1), PNG_SCALE * PNG_MELS)
    reference = decode_flac((folder / f"{keys[0]}.reference.flac").read_bytes())[0]
    assert np.abs(reference).max() > 0.01  # the clip's own latent decodes to sound

    again = decode_flac((folder / f"{keys[0]}.flac").read_bytes())[0]
    _, files2 = validator.run(120)  # the same step again: the folder is replaced, references written once
    assert sorted(p.name for p in files2) == sorted(f"{k}.{e}" for k in keys for e in ("flac", "png"))
    assert sorted(folder.iterdir()) == sorted(files2)
    assert np.array_equal(decode_flac((folder / f"{keys[0]}.flac").read_bytes())[0], again)  # fixed noise
    assert [p.name for p in (tmp_path / "validation").iterdir()] == ["step-000120"]  # no temp folder left


def _copy_with(train_world, tmp_path, change):
    copy = tmp_path / "dataset"
    shutil.copytree(train_world, copy)
    info = json.loads((copy / "dataset.json").read_text())
    change(info)
    (copy / "dataset.json").write_text(json.dumps(info))
    return copy


def test_no_val_split_turns_validation_off_with_one_line(world, train_world, tmp_path, caplog):
    _, objective = world
    copy = _copy_with(train_world, tmp_path, lambda info: info["clips"].pop("val"))
    cfg = _config(train_world, tmp_path / "out", f"val_dataset={copy}")  # no val split, but a train split
    assert Validator(cfg, objective, rank=0, world_size=1, device="cpu", out_dir=tmp_path).split == "train"
    cfg = _config(copy, tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="selva.validation"):
        validator = _validator(cfg, objective, tmp_path)
        assert validator.run(5) == ({}, []) and validator.run(10) == ({}, []) and not validator.due(cfg.steps)
    assert len(caplog.records) == 1 and "no val split" in caplog.records[0].getMessage()


def test_official_encoders_skip_audio_with_one_line(world, train_world, tmp_path, caplog):
    cfg, objective = world
    copy = _copy_with(train_world, tmp_path, lambda info: info["extra"].update(encoders_family="official"))
    cfg = _config(train_world, tmp_path / "out", f"val_dataset={copy}", "validation.batches=1")
    with caplog.at_level(logging.INFO, logger="selva.validation"):
        metrics, files = _validator(cfg, objective, tmp_path).run(5)
    assert files == [] and metrics["val/samples"] == 4
    assert len(caplog.records) == 1 and "official encoders" in caplog.records[0].getMessage()
