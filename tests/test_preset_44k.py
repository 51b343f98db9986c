"""A 44.1 kHz model through the whole pipeline: ``tiny_44k`` (the tiny widths at the 44.1 kHz rates).

synth world at 44.1 kHz -> ``selva precompute --preset tiny_44k`` (Ray, embedded encoders) -> ``selva
train`` (2 steps) -> ``selva generate``: the audio is decoded, stored, encoded and written at 44,100 Hz
with the 44.1 kHz sequence lengths (87 latents of 1024 samples for 2 s), and the generated flac holds
exactly duration x 44,100 samples. A 16 kHz dataset cannot train the 44.1 kHz preset.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from tests.train_launch import REPO, explain, job_env

DURATION, RATE, LATENTS = 2.0, 44_100, 87  # ceil(2 * 44100 / 512 / 2)


@pytest.fixture(scope="module")
def dataset_44k(tmp_path_factory) -> Path:
    from pipelines.synth_world import SynthOptions, write_synth
    from preprocessing.shards import read_dataset_info
    from selva_cli.main import main

    root = tmp_path_factory.mktemp("preset-44k")
    write_synth(root / "world", SynthOptions(clips=4, test_clips=2, preset="tiny_44k"))
    # the command a user runs (its --preset choices are every preset's)
    assert main(["precompute", "--input", str(root / "world" / "clips.tsv"), "--out", str(root / "dataset"),
                 "--preset", "tiny_44k", "--workers", "1", "--samples-per-shard", "4", "--no-progress",
                 "--max-failed-fraction", "0"]) == 0
    assert sum(split["ok"] for split in read_dataset_info(root / "dataset").samples.values()) == 4
    return root / "dataset"


def _flac(data: bytes) -> tuple[int, np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        rate = container.streams.audio[0].codec_context.sample_rate
        wave = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return rate, wave


def test_the_world_its_benchmark_and_inspect_are_at_44k(dataset_44k: Path, capsys) -> None:
    """The synthetic world's clips, its held-out benchmark's references and ``selva inspect`` all at 44.1 kHz."""
    from selva_cli.main import main

    world = dataset_44k.parent / "world"
    targets = sorted((world / "test" / "benchmark").glob("*/target_audio/*.flac"))
    assert targets and all(_flac(p.read_bytes())[0] == RATE for p in targets)
    assert all(_flac(p.read_bytes())[1].size == round(DURATION * RATE) for p in targets)
    capsys.readouterr()
    assert main(["inspect", "--preset", "tiny_44k", str(world / "clips" / "world000000.mp4")]) == 0
    printed = capsys.readouterr().out
    assert "audio 44.1 kHz mono" in printed and f"{LATENTS * 1024} samples at {RATE} Hz" in printed


def test_precompute_writes_44k_audio_and_latents(dataset_44k: Path) -> None:
    from preprocessing.shard_reader import iter_dataset
    from preprocessing.shards import read_dataset_info

    info = read_dataset_info(dataset_44k)
    assert info.preset == "tiny_44k"
    assert info.encoders["codec"]["sampling_rate"] == RATE
    assert info.sequence_lengths["latent"] == LATENTS and info.sequence_lengths["audio_samples"] == LATENTS * 1024
    samples = list(iter_dataset(dataset_44k))
    assert len(samples) == 4
    for sample in samples:
        assert sample.arrays["latent_mean"].shape == (LATENTS, 40)
        rate, wave = _flac(sample.audio_flac)
        assert rate == RATE and wave.size == LATENTS * 1024  # whole latents, zero-padded past 2 s
        assert np.abs(wave[: round(DURATION * RATE)]).max() > 0.01  # the clip's sound is there


def test_train_and_generate_a_44k_flac_of_exactly_duration_samples(dataset_44k: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    cmd = [sys.executable, "-m", "training.train", "--config", "configs/train/tiny.yaml", "preset=tiny_44k",
           f"dataset={dataset_44k}", f"out={out}", "steps=2", "loader.batch_size=2", "loader.num_workers=0",
           "checkpoint_every=2", "validation.audio_clips=0", "validation.batches=0",
           f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    result = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, explain(result)
    export = json.loads((out / "final" / "export.json").read_text())
    assert export["preset"] == "tiny_44k"

    video = dataset_44k.parent / "world" / "clips" / "world000000.mp4"
    gen = [sys.executable, "-m", "selva_cli.main", "generate", "--checkpoint", str(out / "final"), "--video",
           str(video), "--prompt", "red square beeping", "--out", str(tmp_path / "gen"), "--name", "clip", "--steps",
           "2"]
    result = subprocess.run(gen, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, explain(result)
    rate, wave = _flac((tmp_path / "gen" / "clip.flac").read_bytes())
    assert rate == RATE and wave.size == round(DURATION * RATE) == 88_200
    wrong = [*gen[:-4], "--preset", "small_44k", "--steps", "2"]  # an export knows its preset: another is refused
    result = subprocess.run(wrong, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "is a tiny_44k export; --preset small_44k does not fit it" in result.stderr
    assert "Traceback" not in result.stderr, explain(result)

    # a benchmark at the model's rate -> generate --manifest -> evaluate, whose embedder resamples 44.1 -> 48 kHz
    from selva_cli.main import main
    from tests.tiny_clap import write_tiny_clap

    bench, many = tmp_path / "bench", tmp_path / "many"
    assert main(["benchmark", "build", "--clips", str(dataset_44k.parent / "world" / "clips.tsv"), "--out",
                 str(bench), "--duration", "2", "--frame-size", "32", "--partners", "1", "--sample-rate", "44100"]) == 0
    targets = sorted(bench.glob("*/target_audio/*.flac"))
    assert targets and all(_flac(p.read_bytes())[0] == RATE and _flac(p.read_bytes())[1].size == 88_200
                           for p in targets)
    assert main(["generate", "--checkpoint", str(out / "final"), "--manifest", str(bench), "--out", str(many),
                 "--steps", "2"]) == 0
    generated = sorted(many.glob("*/*.flac"))
    assert len(generated) == len(targets) and all(_flac(p.read_bytes())[1].size == 88_200 for p in generated)
    report_path = tmp_path / "metrics.json"
    assert main(["evaluate", "--generated", str(many), "--reference", str(bench), "--embedders",
                 f"clap={write_tiny_clap(tmp_path / 'clap')}", "--out", str(report_path), "--duration", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(report_path.read_text())
    assert report["pairs"] == len(targets)
    assert report["embedders"]["clap"]["sample_rate"] == 48_000  # resampled from 44.1 kHz
    assert report["metrics"]["overall"]["LAION-CLAP-Score"]["files"] == len(targets)


def test_a_16k_dataset_cannot_train_the_44k_preset(tmp_path: Path, train_world: Path) -> None:
    """The tiny (16 kHz) training world with preset=tiny_44k: one line naming the mismatch, before any step."""
    cmd = [sys.executable, "-m", "training.train", "--config", "configs/train/tiny.yaml", "preset=tiny_44k",
           f"dataset={train_world}", f"out={tmp_path / 'out'}", "steps=1", "loader.num_workers=0"]
    result = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "tiny_44k" in result.stderr and "Traceback" not in result.stderr, explain(result)


def test_the_44k_weights_layout_and_its_errors(tmp_path: Path) -> None:
    """The release's 44.1 kHz file names per size; a missing file is named with where it goes; the tiny
    44.1 kHz preset is refused by the official encoders in one line."""
    from selva.encoders import build_encoders
    from selva.presets import SMALL_44K, TINY_44K
    from selva.weight_layout import official_files
    from selva.weights import MissingWeightsError

    medium = official_files("medium_44k")
    assert medium["selva_generator"].path == "weights/generator_medium_44k_sup_5.pth"
    assert medium["mmaudio_generator"].path == "weights/mmaudio_medium_44k.pth"
    assert medium["vae"].path == "ext_weights/v1-44.pth"
    assert medium["vocoder"].path == "ext_weights/bigvgan_v2_44khz_128band_512x/bigvgan_generator.pt"
    assert medium["textsynch"] == official_files("small_16k")["textsynch"]  # one video encoder for all sizes
    assert official_files("small_16k")["vae"].path == "ext_weights/v1-16.pth"
    (tmp_path / "ext_weights").mkdir()
    (tmp_path / "ext_weights" / "v1-44.pth").write_bytes(b"")
    with pytest.raises(MissingWeightsError) as err:
        build_encoders("official", SMALL_44K, tmp_path)
    text = str(err.value)
    assert "bigvgan_v2_44khz_128band_512x/bigvgan_generator.pt is missing" in text
    assert "v1-44.pth is missing" not in text
    assert "v1-16.pth" not in text and "best_netG.pt" not in text
    with pytest.raises(ValueError, match="tiny_44k is not a released size"):
        build_encoders("official", TINY_44K, tmp_path)


def test_generate_names_every_missing_file_of_an_official_folder_before_loading(tmp_path: Path) -> None:
    from training.generate import GenerationError, load_model

    folder = tmp_path / "release"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "generator_large_44k_sup_5.pth").write_bytes(b"")  # nothing is read before the check
    with pytest.raises(GenerationError) as err:
        load_model(folder, preset="large_44k")
    text = str(err.value)
    for missing in ("weights/video_enc_sup_5.pth", "ext_weights/v1-44.pth",
                    "ext_weights/bigvgan_v2_44khz_128band_512x/bigvgan_generator.pt", "flan-t5-base",
                    "clip-vit-h-14-384"):
        assert f"{missing} is missing" in text
    assert "generator_large_44k_sup_5.pth is missing" not in text
