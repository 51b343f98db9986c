"""The synthetic proof's world and scorer (issue 13): ``selva synth``'s files show and sound their events
together, the onset detector finds tone bursts and nothing in silence, and the scorer gives ground truth
its known answers (sync 1, the other object's events at chance, a 200 ms shift low, silence 0)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipelines.synth_world import SynthOptions, write_synth
from preprocessing.compact import encode_flac
from preprocessing.media import decode_clip
from training.benchmark_read import read_benchmark
from training.onsets import OnsetConfig, detect_onsets, dominant_kind, match_onsets, onset_f1
from training.synth_score import read_world_table, score_folder, score_ground_truth

RATE = 16_000


def _bursts(times: list[float], pitch: float = 900.0, seconds: float = 2.0, noise: float = 5e-4) -> np.ndarray:
    rng = np.random.default_rng(0)
    audio = rng.normal(0, noise, round(seconds * RATE))
    t = np.arange(round(0.2 * RATE)) / RATE
    burst = 0.5 * np.sin(2 * np.pi * pitch * t) * np.exp(-t / 0.08) * np.minimum(1, t / 0.002)
    for start in times:
        i = round(start * RATE)
        audio[i : i + len(burst)] += burst[: len(audio) - i]
    return audio


def test_onsets_of_tone_bursts_are_found_within_a_frame_and_silence_has_none():
    times = [0.12, 0.57, 1.03, 1.61]
    found = detect_onsets(_bursts(times), RATE)
    assert len(found) == len(times) and np.abs(found - times).max() <= 0.02
    assert len(detect_onsets(np.zeros(2 * RATE), RATE)) == 0
    assert len(detect_onsets(_bursts([]), RATE)) == 0  # the noise floor alone: no onset
    assert onset_f1(_bursts(times), RATE, times) == 1.0
    assert onset_f1(_bursts(times), RATE, [t + 0.2 for t in times]) == 0.0  # 200 ms late: outside ±80 ms
    assert onset_f1(np.zeros(2 * RATE), RATE, times) == 0.0
    # one-to-one matching: two detections near one event count once
    match = match_onsets([0.50, 0.56], [0.52])
    assert (match.matched, match.precision, match.recall) == (1, 0.5, 1.0)
    assert dominant_kind(_bursts(times, pitch=1800.0), RATE, [400.0, 900.0, 1800.0, 3600.0]) == 2


def test_a_ripple_in_a_bursts_tail_is_not_a_new_onset():
    """Griffin-Lim leaves dips of ~20 dB in a decaying burst's tail; the level climbing back out of one
    (here 0.14 s after the onset, to 11 dB under the burst's peak) is the same sound, not a new one. A
    real burst 0.4 s later (the world's minimum gap) still counts."""
    audio = _bursts([0.3, 0.7])
    assert len(detect_onsets(audio, RATE, OnsetConfig(memory_s=0.0))) == 2
    dip, back = round(0.40 * RATE), round(0.44 * RATE)
    audio[dip:back] *= 0.05  # -26 dB for 40 ms, then the tail as it was
    assert len(detect_onsets(audio, RATE, OnsetConfig(memory_s=0.0))) == 3  # a rise-only rule is fooled
    found = detect_onsets(audio, RATE)
    assert len(found) == 2 and np.abs(found - [0.3, 0.7]).max() <= 0.02


def test_the_ground_truth_through_the_embedded_codec_keeps_every_onset(world):
    """Every generated track is decoded by the embedded codec (Griffin-Lim): its own artefacts must not read
    as onsets, or no model could score sync 1. The world's clean tracks, encoded and decoded, score 1."""
    import torch

    from selva.audio.embedded_codec import EmbeddedCodec

    codec = EmbeddedCodec()
    table = read_world_table(world / "test" / "clips.tsv")
    for clip_id, info in table.items():
        clip = decode_clip(str(world / "test" / "clips" / f"{clip_id}.mp4"), duration=2.0, frame_size=64)
        latent, _ = codec.encode(torch.from_numpy(clip.audio[:32256]).float()[None])
        decoded = codec.decode(latent)[0].numpy()
        assert onset_f1(decoded, RATE, info.onsets) == 1.0, clip_id


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    summary = write_synth(out, SynthOptions(clips=8, test_clips=4, seed=1))
    assert summary == {"clips": 8, "test_clips": 4, "composites": summary["composites"]}
    return out


def test_synth_clips_flash_and_sound_together(world):
    with open(world / "clips.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["split"] for r in rows] == ["train"] * 6 + ["val"] * 2
    assert len({r["label"] for r in rows}) == 4  # every kind
    for row in rows:
        clip = decode_clip(str(world / row["path"]), duration=2.0, frame_size=64)
        brightness = clip.frames.reshape(len(clip.frames), -1).mean(axis=1)
        lit = brightness > (brightness.min() + brightness.max()) / 2
        flashes = [i / 25 for i in np.flatnonzero(lit[1:] & ~lit[:-1]) + 1]
        events = [float(t) for t in row["onsets"].split(",")]
        assert flashes == pytest.approx(events, abs=1e-6)
        sounds = detect_onsets(clip.audio, clip.sample_rate)
        assert len(sounds) == len(events) and np.abs(sounds - events).max() <= 0.04  # within one frame


def test_the_scorer_gives_ground_truth_its_known_answers(world, tmp_path):
    bench, table = world / "test" / "benchmark", world / "test" / "clips.tsv"
    items = read_benchmark(bench)
    assert len(items) % 4 == 0 and {i.placement for i in items} == {"left", "right"}
    pictures = {}  # every composite picture is asked for each of its two objects
    for item in items:
        left = item.target if item.placement == "left" else item.partner
        right = item.partner if item.placement == "left" else item.target
        pictures.setdefault((left, right), set()).add(item.target)
    assert all(len(asked) == 2 for asked in pictures.values())

    truth = score_ground_truth(bench, table)
    assert truth["sync"] == 1.0 and truth["pitch_selectivity"] == 1.0
    clips = read_world_table(table)
    chance = np.mean([match_onsets(clips[i.target].onsets, clips[i.partner].onsets).f1 for i in items])
    assert truth["distractor_sync"] == pytest.approx(chance, abs=0.05) and truth["distractor_sync"] < 0.5
    assert score_ground_truth(bench, table, shift_s=0.2)["sync"] <= 0.2

    for item in items:  # silence scores 0
        (tmp_path / item.subset).mkdir(exist_ok=True)
        (tmp_path / item.subset / f"{item.name}.flac").write_bytes(encode_flac(np.zeros(2 * RATE), RATE))
    silent = score_folder(tmp_path, bench, table)
    assert silent["sync"] == 0.0 and silent["distractor_sync"] == 0.0 and silent["items"] == len(items)


def test_cli_reruns_to_the_same_bytes_and_refuses_other_options(tmp_path, capsys):
    from selva_cli.main import main

    args = ["synth", "--out", str(tmp_path / "w"), "--clips", "4", "--test-clips", "2", "--seed", "3"]
    assert main(args) == 0
    files = {p: p.read_bytes() for p in (tmp_path / "w").rglob("*") if p.is_file() and p.name != "synth.json"}
    assert len([p for p in files if p.suffix == ".mp4"]) == 4 + 2 + 4  # clips, held-out clips, composites
    written = {p: p.stat().st_mtime_ns for p in files}
    assert main(args) == 0  # a rerun of a complete run writes nothing
    assert {p: p.stat().st_mtime_ns for p in files} == written
    # a killed run leaves status "writing" (and maybe files missing): the rerun writes the same bytes
    marker = tmp_path / "w" / "synth.json"
    marker.write_text(marker.read_text().replace('"complete"', '"writing"'))
    next(p for p in files if p.suffix == ".mp4").unlink()
    assert main(args) == 0
    assert {p: p.read_bytes() for p in files} == files
    next(p for p in files if p.suffix == ".mp4").unlink()  # a complete run with a file gone is redone too
    assert main(args) == 0
    assert {p: p.read_bytes() for p in files} == files
    capsys.readouterr()
    assert main([*args[:-1], "4"]) == 1
    out = tmp_path / "w"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out}: written with other options ({out / 'synth.json'}); synth into a new folder"]
