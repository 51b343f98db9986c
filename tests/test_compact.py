"""The compact shard members: sync.mp4 (H.264) and audio.flac (preprocessing.compact)."""

from __future__ import annotations

import ctypes
import glob
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import require_shared
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
    require_shared(path / CLIPS[0], "the real clips")
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


_ENCODE_IN_SUBPROCESS = """
import hashlib, sys
import numpy as np
from preprocessing.compact import encode_sync_mp4
print(hashlib.sha256(encode_sync_mp4(np.load(sys.argv[1]))).hexdigest())
"""


def test_sync_mp4_bytes_are_reproducible(real_dir: Path, tmp_path: Path) -> None:
    # a rerun of a shard must produce the same bytes: in this process and in fresh ones
    frames = decoded_real(CLIPS[1], 64).frames[:50]
    data = encode_sync_mp4(frames)
    assert encode_sync_mp4(frames) == data
    np.save(tmp_path / "frames.npy", frames)
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", _ENCODE_IN_SUBPROCESS, str(tmp_path / "frames.npy")],
                         cwd=root, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    digests = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert digests == [hashlib.sha256(data).hexdigest()] * 2


def _force_ffmpeg_cpu_flags(flags: int) -> None:
    """``av_force_cpu_flags`` of the libavutil that PyAV loaded (0: no SIMD, -1: detect again)."""
    libs = glob.glob(str(Path(av.__file__).parent.parent / "av.libs" / "libavutil*.so*"))
    if not libs:
        pytest.skip("PyAV's bundled libavutil not found (not a PyAV wheel)")
    ctypes.CDLL(libs[0]).av_force_cpu_flags(flags)


def test_sync_mp4_bytes_do_not_depend_on_the_cpu_code_path(real_dir: Path, monkeypatch) -> None:
    # x264 picks some algorithms by CPU (intra mode search, mbtree) and swscale's fast rgb24->yuv420p
    # rounds differently in SIMD and C, so the bytes depended on the code path (issue 9). Plain C
    # everywhere (x264 asm=0, FFmpeg without SIMD) stands in for "another CPU": with the
    # configuration before the fix (no cpu-independent, PyAV's default reformat) the bytes differ here.
    from preprocessing import compact

    if video_encoder() != "libx264":
        pytest.skip("x264 options only")
    frames = decoded_real(CLIPS[1], 64).frames[:50]
    reference = encode_sync_mp4(frames)
    monkeypatch.setattr(compact, "SYNC_X264_PARAMS", compact.SYNC_X264_PARAMS + ":asm=0")
    _force_ffmpeg_cpu_flags(0)
    try:
        plain_c = encode_sync_mp4(frames)
    finally:
        _force_ffmpeg_cpu_flags(-1)
    assert plain_c == reference


# fesetround's constants: (down, up, toward zero) per machine
_ROUNDING_MODES = {"x86_64": (0x400, 0x800, 0xC00), "aarch64": (0x800000, 0x400000, 0xC00000)}


@pytest.mark.parametrize("mode_index", [0, 1, 2], ids=["down", "up", "toward_zero"])
def test_encoded_bytes_do_not_depend_on_the_callers_rounding_mode(real_dir: Path, mode_index: int) -> None:
    # x264 rounds each macroblock's QP from floating point: under another rounding mode the same planes
    # gave issue 9's signature (same length, a few QPs one step apart, identical decoded frames), with
    # or without cpu-independent. The encoders run in the default environment, whatever the caller set.
    import platform

    from preprocessing.compact import _libm

    libm, modes = _libm(), _ROUNDING_MODES.get(platform.machine())
    if libm is None or modes is None:
        pytest.skip("rounding-mode constants known for Linux on x86-64 and aarch64 only")
    frames = decoded_real(CLIPS[1], 64).frames[:50]
    audio = decoded_real(CLIPS[1], 64).audio
    video_ref, audio_ref = encode_sync_mp4(frames), encode_flac(audio, 16_000)
    assert libm.fesetround(modes[mode_index]) == 0
    try:
        video, flac = encode_sync_mp4(frames), encode_flac(audio, 16_000)
        assert libm.fegetround() == modes[mode_index]  # the caller's environment is given back
    finally:
        libm.fesetround(0)
    assert video == video_ref and flac == audio_ref


def test_sync_mp4_encoder_input_is_deterministic() -> None:
    # the pinned causes: single-threaded, bit-exact RGB->yuv420p, and no CPU-dependent x264 algorithms
    from av.video.reformatter import Interpolation

    from preprocessing import compact

    assert compact.SYNC_SWS_THREADS == 1
    assert compact.SYNC_SWS_FLAGS & Interpolation.BITEXACT and compact.SYNC_SWS_FLAGS & Interpolation.ACCURATE_RND
    assert "cpu-independent=1" in compact.SYNC_X264_PARAMS.split(":") and compact.SYNC_THREADS == "1"
    # swscale's exact path: C and SIMD give the same planes (the default fast path does not)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    reformatter = av.video.reformatter.VideoReformatter()
    simd = compact.to_yuv420p(reformatter, rgb).to_ndarray()
    _force_ffmpeg_cpu_flags(0)
    try:
        plain_c = compact.to_yuv420p(av.video.reformatter.VideoReformatter(), rgb).to_ndarray()
    finally:
        _force_ffmpeg_cpu_flags(-1)
    np.testing.assert_array_equal(simd, plain_c)


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
