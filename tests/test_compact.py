"""The compact shard members: sync.mp4 (H.264) and audio.flac (preprocessing.compact)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
import pytest
from media_fixtures import decoded_real, real_clips_dir

from preprocessing.compact import (
    decode_flac,
    decode_sync_mp4,
    encode_flac,
    encode_sync_mp4,
    video_encoder,
)

CLIPS = ["0B4dYTMsgHA_000130.mp4", "F8Zt3mYlOqU_000094.mp4"]

# Mean absolute pixel error of decode(encode(frames)) at CRF 20, measured on the two real clips
# (8 s, 200 frames): 3.70 / 3.47 at 64 px and 2.82 / 2.70 at 224 px, of which yuv420p's halved
# chroma alone accounts for ~1.45 (64 px) and ~1.19 (224 px). The bounds leave ~15% over the worst
# clip; a wrong colour matrix or range costs far more (> 10), and CRF 23 already reaches 4.49 / 3.32.
MAX_MEAN_ABS_ERROR = {64: 4.25, 224: 3.25}


@pytest.fixture(scope="module")
def real_dir() -> Path:
    path = real_clips_dir()
    if not (path / CLIPS[0]).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"real clips not found at {path}")
        pytest.skip(f"real clips not found at {path} (set SELVA_SHARED to the shared folder)")
    return path


def test_encoder_found() -> None:
    # PyAV 18.1's wheels bundle libx264; other builds fall back in this order
    assert video_encoder() in ("libx264", "h264", "libopenh264", "mpeg4")


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("name", CLIPS)
def test_sync_mp4_round_trip_on_real_clips(real_dir: Path, name: str, size: int, record_property) -> None:
    frames = decoded_real(name, size).frames
    data = encode_sync_mp4(frames)
    back = decode_sync_mp4(data)
    assert back.shape == frames.shape and back.dtype == np.uint8
    error = float(np.abs(back.astype(np.int16) - frames.astype(np.int16)).mean())
    record_property("mean_abs_pixel_error", error)
    record_property("bytes", len(data))
    print(f"{name} {size}px: mean abs error {error:.3f}, {len(data)} bytes ({frames.nbytes / len(data):.0f}x smaller)")
    assert error < MAX_MEAN_ABS_ERROR[size]
    assert len(data) < frames.nbytes / 50  # compact: H.264, not raw frames


def test_mpeg4_fallback_round_trips(real_dir: Path, monkeypatch) -> None:
    # the path taken by a PyAV build without any H.264 encoder; measured 3.52 mean abs error at 64 px
    from preprocessing import compact

    monkeypatch.setattr(compact, "video_encoder", lambda: "mpeg4")
    frames = decoded_real(CLIPS[1], 64).frames
    back = decode_sync_mp4(encode_sync_mp4(frames))
    assert back.shape == frames.shape
    assert np.abs(back.astype(np.int16) - frames.astype(np.int16)).mean() < MAX_MEAN_ABS_ERROR[64]


def test_sync_mp4_stream_layout(real_dir: Path) -> None:
    frames = decoded_real(CLIPS[0], 64).frames[:30]
    with av.open(io.BytesIO(encode_sync_mp4(frames))) as container:
        assert [s.type for s in container.streams] == ["video"]  # no audio track
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 64)
        assert stream.average_rate == 25
        times = [frame.time for frame in container.decode(stream)]
    assert times == pytest.approx([i / 25 for i in range(30)])


def test_sync_mp4_bytes_are_reproducible(real_dir: Path) -> None:
    # a rerun of a shard must produce the same bytes (x264's scene-cut detection is off for this)
    frames = decoded_real(CLIPS[1], 224).frames[:60]
    assert encode_sync_mp4(frames) == encode_sync_mp4(frames)


def test_sync_mp4_exact_frame_count_for_short_and_odd_lengths() -> None:
    rng = np.random.default_rng(0)
    for count in (1, 7, 33):
        frames = rng.integers(0, 256, size=(count, 32, 48, 3), dtype=np.uint8)
        assert decode_sync_mp4(encode_sync_mp4(frames)).shape == (count, 32, 48, 3)


def test_sync_mp4_rejects_bad_frames() -> None:
    with pytest.raises(ValueError, match="even"):
        encode_sync_mp4(np.zeros((2, 63, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_sync_mp4(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError):
        encode_sync_mp4(np.zeros((0, 64, 64, 3), np.uint8))


@pytest.mark.parametrize("name", CLIPS)
def test_flac_round_trip_is_lossless_after_16bit_quantisation(real_dir: Path, name: str, record_property) -> None:
    audio = decoded_real(name, 64).audio
    data = encode_flac(audio, 16_000)
    back, rate = decode_flac(data)
    assert rate == 16_000 and back.shape == audio.shape and back.dtype == np.float32
    error = float(np.abs(back - audio).max())
    record_property("max_abs_error", error)
    print(f"{name} flac: max abs error {error * 32768:.3f} / 32768, {len(data)} bytes")
    assert error <= 0.5 / 32768 + 1e-9  # rounding to the nearest s16 step: half a step at most
    np.testing.assert_array_equal(back, np.round(audio.astype(np.float64) * 32768) / 32768)  # nothing else lost
    assert encode_flac(audio, 16_000) == data  # reproducible bytes


def test_flac_full_scale_and_odd_lengths() -> None:
    for n in (1, 4607, 4609):  # around the encoder's 4608-sample block
        audio = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        back, rate = decode_flac(encode_flac(audio, 22_050))
        assert rate == 22_050 and back.shape == (n,)
        assert np.abs(back - audio).max() <= 1 / 32768  # +1.0 is the one value s16 clips by a step


def test_flac_rejects_unnormalised_audio() -> None:
    with pytest.raises(ValueError, match="within"):
        encode_flac(np.array([0.0, 1.5], np.float32), 16_000)
    with pytest.raises(ValueError):
        encode_flac(np.array([0.0, np.nan], np.float32), 16_000)
    with pytest.raises(ValueError):
        encode_flac(np.zeros((2, 10), np.float32), 16_000)
