"""Small synthetic media files for tests, written with PyAV (H.264 + AAC in mp4).

Video frames are flat grey with a level that identifies the frame (``frame_level(i)``), so a test can
tell which source frame a decoder picked even after lossy H.264. Audio is a 440 Hz sine (amplitude
``SINE_AMPLITUDE`` in both channels) or zeros.

Real-world variants (rotation, late clocks, format changes, cover art) are in ``realworld_media``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SINE_HZ = 440.0
SINE_AMPLITUDE = 0.5
_LEVEL_BASE, _LEVEL_STEP, _LEVEL_SPAN = 20, 37, 216  # 37 and 216 coprime: 216 distinct levels, neighbours >= 37 apart


def frame_level(index: int) -> int:
    """Grey level (0-255) of source frame ``index`` in clips made by :func:`make_clip`."""
    return _LEVEL_BASE + (index * _LEVEL_STEP) % _LEVEL_SPAN


def nearest_frame(level: float, candidates: Sequence[int]) -> int:
    """The candidate source frame whose level is closest to a decoded frame's mean level."""
    return min(candidates, key=lambda i: abs(frame_level(i) - level))


def make_clip(
    path: str | Path,
    seconds: float,
    fps: float = 30,
    size: tuple[int, int] = (64, 48),
    audio: bool = True,
    video: bool = True,
    silent: bool = False,
    sample_rate: int = 44100,
    *,
    frame_times: Sequence[float] | None = None,
    faststart: bool = False,
    audio_seconds: float | None = None,
) -> Path:
    """Write a clip of ``seconds`` to ``path`` (container from the suffix: .mp4, .m4a, .mkv, ...).

    ``size`` is (width, height). ``frame_times`` (seconds, increasing) replaces the regular
    ``fps`` grid to make variable-frame-rate video; ``faststart`` puts the index at the front;
    ``audio_seconds`` makes the audio track a different length from the video.
    """
    path = Path(path)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as out:
        vstream = astream = None
        if video:
            vstream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            vstream.width, vstream.height = size
            vstream.pix_fmt = "yuv420p"
            # the encoder's time base must be fine enough for irregular timestamps (else they collide)
            vstream.time_base = Fraction(1, 1000) if frame_times is not None else Fraction(1, round(fps * 1000))
            vstream.codec_context.time_base = vstream.time_base
            vstream.options = {"preset": "ultrafast", "crf": "18"}
        if audio:
            astream = out.add_stream("aac", rate=sample_rate, layout="stereo")
        times = list(frame_times) if frame_times is not None else [i / fps for i in range(round(seconds * fps))]
        n_samples = round((seconds if audio_seconds is None else audio_seconds) * sample_rate)
        chunk = 1024
        next_sample = 0
        for i, t in enumerate(times):
            # interleave: write the audio that precedes this frame first
            while astream is not None and next_sample < n_samples and next_sample / sample_rate <= t:
                next_sample = _write_audio(out, astream, next_sample, min(chunk, n_samples - next_sample), silent)
            if vstream is not None:
                grey = np.full((size[1], size[0], 3), frame_level(i), dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(grey, format="rgb24")
                frame.pts = round(t / vstream.time_base)
                frame.time_base = vstream.time_base
                out.mux(vstream.encode(frame))
        while astream is not None and next_sample < n_samples:
            next_sample = _write_audio(out, astream, next_sample, min(chunk, n_samples - next_sample), silent)
        for stream in (vstream, astream):
            if stream is not None:
                out.mux(stream.encode(None))
    return path


def sine(first: int, count: int, rate: int) -> np.ndarray:
    """Samples ``first`` .. ``first + count`` of the fixture's sine wave (float32)."""
    t = (first + np.arange(count)) / rate
    return (SINE_AMPLITUDE * np.sin(2 * np.pi * SINE_HZ * t)).astype(np.float32)


def _write_audio(
    out: av.container.OutputContainer, stream: av.AudioStream, first: int, count: int, silent: bool
) -> int:
    rate = stream.sample_rate
    wave = np.zeros(count, np.float32) if silent else sine(first, count, rate)
    frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
    frame.sample_rate = rate
    frame.pts = first
    frame.time_base = Fraction(1, rate)
    out.mux(stream.encode(frame))
    return first + count


def write_colour_clip(path: Path, rgb: tuple[int, int, int], tone_hz: float, seconds: float = 1.5) -> Path:
    """A 30 fps 48x32 H.264 clip of one colour with a 44.1 kHz stereo AAC sine of ``tone_hz``."""
    with av.open(str(path), mode="w") as out:
        video = out.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 48, 32, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "18"}
        audio = out.add_stream("aac", rate=44100, layout="stereo")
        n = round(seconds * 44100)
        wave = (0.5 * np.sin(2 * np.pi * tone_hz * np.arange(n) / 44100)).astype(np.float32)
        for first in range(0, n, 1024):
            frame = av.AudioFrame.from_ndarray(np.stack([wave[first : first + 1024]] * 2), format="fltp",
                                               layout="stereo")  # fmt: skip
            frame.sample_rate, frame.pts, frame.time_base = 44100, first, Fraction(1, 44100)
            out.mux(audio.encode(frame))
        for i in range(round(seconds * 30)):
            image = av.VideoFrame.from_ndarray(np.full((32, 48, 3), rgb, np.uint8), format="rgb24")
            image.pts = i
            out.mux(video.encode(image))
        out.mux(video.encode(None))
        out.mux(audio.encode(None))
    return path


def write_text_as(path: str | Path, text: str = "this is not a video\n") -> Path:
    path = Path(path)
    path.write_text(text)
    return path


def truncate_copy(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes to ``dst`` (a download cut short)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def real_clips_dir() -> Path:
    """``<shared>/data/real``: the two real 10 s clips (``$SELVA_SHARED`` or ``../shared``)."""
    from conftest import shared_dir

    return shared_dir() / "data" / "real"


@functools.lru_cache(maxsize=16)
def decoded_real(name: str, frame_size: int, start: float = 0.0, duration: float = 8.0):
    """``decode_clip`` of a real clip, cached across test modules (each decode takes ~0.5-1 s)."""
    from preprocessing.media import decode_clip

    return decode_clip(real_clips_dir() / name, start=start, duration=duration, frame_size=frame_size)
