"""Decoding media into sync frames and training audio (preprocessing.media)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import require_shared
from media_fixtures import (
    decoded_real,
    frame_level,
    make_clip,
    nearest_frame,
    real_clips_dir,
    truncate_copy,
    write_text_as,
)
from realworld_media import (
    make_cover_art_file,
)

from preprocessing.errors import Rejected, RejectReason
from preprocessing.media import (
    AUDIO_SHORTFALL_S,
    MAX_PADDED_FRAMES,
    PTS_TOLERANCE_S,
    TRAIN_PEAK,
    DecodedClip,
    decode_clip,
    probe,
)

CLIP_30FPS = "0B4dYTMsgHA_000130.mp4"  # 1280x720, 30 fps, 10.00 s
CLIP_25FPS = "F8Zt3mYlOqU_000094.mp4"  # 1280x720, 25 fps, 10.04 s (an edit list hides 2.2 s before 0)


@pytest.fixture(scope="module")
def real_dir() -> Path:
    path = real_clips_dir()
    require_shared(path / CLIP_30FPS, "the real clips")
    return path


def raw_audio(clip: DecodedClip) -> np.ndarray:
    """Undo the peak normalisation: the mono 16 kHz signal as decoded."""
    return clip.audio * np.float32(clip.peak / TRAIN_PEAK)


# ---------------------------------------------------------------- real clips


def test_probe_real_clips(real_dir: Path) -> None:
    for name, fps in ((CLIP_30FPS, 30.0), (CLIP_25FPS, 25.0)):
        info = probe(real_dir / name)
        assert info.video is not None and info.audio is not None
        assert (info.video.codec, info.video.width, info.video.height, info.video.fps) == ("h264", 1280, 720, fps)
        assert (info.audio.codec, info.audio.sample_rate, info.audio.channels) == ("aac", 44100, 2)
        assert info.duration == pytest.approx(10.0, abs=0.05)


@pytest.mark.parametrize("name", [CLIP_30FPS, CLIP_25FPS])
def test_real_clip_8s_at_64(real_dir: Path, name: str) -> None:
    clip = decoded_real(name, 64)
    assert clip.frames.shape == (200, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (128_000,) and clip.audio.dtype == np.float32
    assert np.max(np.abs(clip.audio)) == pytest.approx(TRAIN_PEAK, abs=1e-6)
    assert clip.peak > 0.1 and clip.padded_frames == 0 and clip.padded_samples == 0
    assert clip.frames.std() > 10  # real pictures, not a constant fill


def test_real_clip_8s_at_224(real_dir: Path) -> None:
    clip = decoded_real(CLIP_30FPS, 224)
    assert clip.frames.shape == (200, 224, 224, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (128_000,)
    # the same pictures as at 64 px: per-frame mean colours agree to within a few levels
    small = decoded_real(CLIP_30FPS, 64)
    diff = np.abs(clip.frames.mean(axis=(1, 2)) - small.frames.mean(axis=(1, 2)))
    assert diff.max() < 3.0


@pytest.mark.parametrize("name", [CLIP_30FPS, CLIP_25FPS])
def test_start_shifts_both_streams(real_dir: Path, name: str) -> None:
    base, shifted = decoded_real(name, 64), decoded_real(name, 64, start=2.0)
    # 2.0 s is output frame 50 exactly, whatever the source frame rate
    np.testing.assert_array_equal(shifted.frames[:150], base.frames[50:])
    a, b = raw_audio(base)[32_000:], raw_audio(shifted)[:96_000]
    middle = slice(1_600, 96_000 - 1_600)  # away from the resampler's start/end transients
    np.testing.assert_allclose(b[middle], a[middle], atol=1e-4)


def test_start_between_frames_picks_the_earlier_frame(real_dir: Path) -> None:
    # 1.5 s = output frame 37.5: the 25 fps source shows the frame from 1.48 s until 1.52 s, so
    # every output frame k of the shifted clip is source frame 37 + k = frame 37 + k of the base clip
    base, shifted = decoded_real(CLIP_25FPS, 64), decoded_real(CLIP_25FPS, 64, start=1.5)
    np.testing.assert_array_equal(shifted.frames[:163], base.frames[37:])


def test_seek_into_the_middle_of_a_gop_matches_decoding_from_the_top(real_dir: Path) -> None:
    # keyframes of the 25 fps clip sit at 2.8 and 3.2 s: a start of 3.6 s seeks to 3.2 s and decodes
    # from there; audio must land on the same 16 kHz sample grid as a decode from 0
    full = decoded_real(CLIP_25FPS, 64, duration=10.0)
    part = decoded_real(CLIP_25FPS, 64, start=3.6, duration=6.0)
    np.testing.assert_array_equal(part.frames, full.frames[90:240])
    a, b = raw_audio(full)[57_600 : 57_600 + 96_000], raw_audio(part)[:96_000]
    np.testing.assert_allclose(b, a, atol=1e-4)


# ---------------------------------------------------------------- synthetic clips: timing rules


def test_30fps_to_25fps_takes_the_last_frame_at_or_before_each_time(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "c30.mp4", seconds=3.0, fps=30)
    clip = decode_clip(path, start=0.5, duration=2.0, frame_size=32)
    assert clip.frames.shape == (50, 32, 32, 3)
    levels = clip.frames.reshape(50, -1).mean(axis=1)
    for k, level in enumerate(levels):
        expected = math.floor((0.5 + k / 25) * 30 + 1e-9)
        assert nearest_frame(level, range(expected - 2, expected + 3)) == expected, k


def test_variable_frame_rate(tmp_path: Path) -> None:
    gaps_ms = np.random.default_rng(0).integers(10, 70, size=80)
    times = np.concatenate([[0], np.cumsum(gaps_ms)]) / 1000.0  # whole milliseconds: the mp4's time base
    path = make_clip(tmp_path / "vfr.mp4", seconds=2.5, frame_times=times)
    clip = decode_clip(path, duration=2.0, frame_size=32)
    levels = clip.frames.reshape(50, -1).mean(axis=1)
    for k, level in enumerate(levels):
        expected = int(np.searchsorted(times, k / 25 + PTS_TOLERANCE_S, side="right")) - 1
        assert nearest_frame(level, range(max(expected - 2, 0), expected + 3)) == expected, k


def test_audio_is_16khz_mono_of_the_source_tone(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "tone.mp4", seconds=2.5, fps=25, sample_rate=48_000)
    clip = decode_clip(path, duration=2.0, frame_size=32)
    assert clip.audio.shape == (32_256,)  # SequenceConfig(2.0).num_audio_frames
    body = clip.audio[:32_000]
    spectrum = np.abs(np.fft.rfft(body))
    assert np.argmax(spectrum) * 16_000 / len(body) == pytest.approx(440, abs=1)
    assert not clip.audio[32_000:].any()  # the tail beyond duration * 16 kHz is zeros


def test_padding_allowances(tmp_path: Path) -> None:
    # 48 of 50 frames (2 missing) and 1.92 s of 2 s audio (0.08 s missing): padded, not rejected
    near = decode_clip(make_clip(tmp_path / "near.mp4", seconds=1.92, fps=25), duration=2.0, frame_size=32)
    assert near.padded_frames == 2 <= MAX_PADDED_FRAMES
    np.testing.assert_array_equal(near.frames[48], near.frames[47])
    np.testing.assert_array_equal(near.frames[49], near.frames[47])
    assert 0 < near.padded_samples <= AUDIO_SHORTFALL_S * 16_000
    assert not near.audio[32_000 - near.padded_samples :].any()
    # 46 of 50 frames: too short
    with pytest.raises(Rejected) as info:
        decode_clip(make_clip(tmp_path / "short.mp4", seconds=1.84, fps=25), duration=2.0, frame_size=32)
    assert info.value.reason is RejectReason.TOO_SHORT
    assert "short.mp4: video has 46 frames from 0.00 s, 50 needed for 2 s" in info.value.message
    # full video, audio 0.25 s short: too short on audio
    with pytest.raises(Rejected) as info:
        decode_clip(make_clip(tmp_path / "mute_end.mp4", 2.5, 25, audio_seconds=1.75), duration=2.0, frame_size=32)
    assert info.value.reason is RejectReason.TOO_SHORT
    said = re.search(r"audio has ([0-9.]+) s from 0.00 s, 2 s needed", info.value.message)
    assert said and float(said.group(1)) == pytest.approx(1.75, abs=0.03)  # AAC codes whole 23 ms frames


def test_start_past_the_end_is_too_short(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "c.mp4", seconds=3.0, fps=25)
    with pytest.raises(Rejected) as info:
        decode_clip(path, start=5.0, duration=2.0, frame_size=32)
    assert info.value.reason is RejectReason.TOO_SHORT and "video has 0 frames from 5.00 s" in info.value.message


def test_bad_arguments_are_errors_not_rejections(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "c.mp4", seconds=1.0)
    with pytest.raises(ValueError):
        decode_clip(path, duration=0, frame_size=64)
    with pytest.raises(ValueError):
        decode_clip(path, start=-1, duration=1, frame_size=64)


# ---------------------------------------------------------------- bad inputs


def _corrupt(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    at = data.find(b"mdat") + 200
    data[at : at + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def test_every_bad_input_gets_its_reason(tmp_path: Path) -> None:
    good = make_clip(tmp_path / "good.mp4", seconds=2.5)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cases: list[tuple[Path, float, str | None, str]] = [
        (good, 2.0, None, ""),
        (empty, 2.0, "undecodable", "empty (0 bytes)"),
        (truncate_copy(good, tmp_path / "truncated.mp4"), 2.0, "undecodable", "cannot open"),
        (write_text_as(tmp_path / "text.mp4"), 2.0, "undecodable", "cannot open"),
        (_corrupt(make_clip(tmp_path / "f.mp4", 2.5, faststart=True), tmp_path / "corrupt.mp4"), 2.0, "undecodable",
         "decoding failed"),
        (make_clip(tmp_path / "audio_only.m4a", 2.5, video=False), 2.0, "no_video", "no video stream"),
        (make_cover_art_file(tmp_path / "cover.m4a", 2.5), 2.0, "no_video", "no video stream"),
        (make_clip(tmp_path / "video_only.mp4", 2.5, audio=False), 2.0, "no_audio", "no audio stream"),
        (make_clip(tmp_path / "two_s.mp4", 2.0), 8.0, "too_short", "video has 50 frames from 0.00 s, 200 needed"),
        (make_clip(tmp_path / "silent.mp4", 2.5, silent=True), 2.0, "silent", "silent"),
        (tmp_path / "missing.mp4", 2.0, "missing_file", "no such file"),
        (tmp_path, 2.0, "missing_file", "not a regular file"),
        (good, 2.0, None, ""),  # still fine after all of the above
    ]
    results = []
    for path, duration, _, _ in cases:  # one loop, as precompute runs it: a rejection never stops the rest
        try:
            results.append(decode_clip(path, duration=duration, frame_size=32))
        except Rejected as rej:
            results.append(rej)
    for (path, _, reason, words), result in zip(cases, results, strict=True):
        if reason is None:
            assert isinstance(result, DecodedClip), result
        else:
            assert isinstance(result, Rejected), (path, result)
            assert result.reason.value == reason, (path, result)
            assert str(path) in result.message and words in result.message, result.message


def test_truncated_file_with_index_up_front_is_too_short(tmp_path: Path) -> None:
    # with the index first (faststart) half a file opens, and only the frames that made it decode
    src = make_clip(tmp_path / "full.mp4", seconds=3.0, faststart=True)
    with pytest.raises(Rejected) as info:
        decode_clip(truncate_copy(src, tmp_path / "half.mp4"), duration=2.5, frame_size=32)
    assert info.value.reason is RejectReason.TOO_SHORT


def test_file_objects_decode_like_paths(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "c.mp4", seconds=2.2, fps=25)
    from_path = decode_clip(path, duration=2.0, frame_size=32)
    with path.open("rb") as fh:
        from_file = decode_clip(fh, duration=2.0, frame_size=32, name="c.mp4")
    np.testing.assert_array_equal(from_file.frames, from_path.frames)
    np.testing.assert_array_equal(from_file.audio, from_path.audio)
    assert frame_level(0) - 4 < from_path.frames[0].mean() < frame_level(0) + 4


@pytest.mark.parametrize("start", [1e15, 1e300])
def test_a_start_far_past_the_end_is_too_short_not_a_crash(tmp_path, start):
    path = make_clip(tmp_path / "clip.mp4", seconds=2.5)
    with pytest.raises(Rejected) as err:
        decode_clip(path, start=start, duration=2.0, frame_size=32)
    assert err.value.reason is RejectReason.TOO_SHORT and str(path) in err.value.message
