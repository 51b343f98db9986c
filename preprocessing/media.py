"""Probe and decode media files into the model's inputs, with PyAV (DESIGN §3, §6).

``decode_clip`` turns the time range [start, start + duration) of a video file into

* sync frames: 25 fps, squashed (both axes resized, no crop) to ``frame_size``, uint8 (T, S, S, 3),
  T = ``SequenceConfig(duration).sync_num_frames`` exactly;
* audio: mono 16 kHz float32 of exactly ``SequenceConfig(duration).num_audio_frames`` samples,
  peak-normalised to 0.95 (the raw peak is kept).

Rules (module constants, so tests and docs can name them):

* frame selection: output frame k shows the last source frame whose pts <= start + k/25 (+ 1 ms of
  tolerance for millisecond time bases): 30 -> 25 fps and variable frame rates alike.
* video padding: up to ``MAX_PADDED_FRAMES`` output frames that no source frame covers (before the
  first or after the last frame's end) repeat the nearest real frame; more is ``too_short``.
* audio: samples are taken from [start, start + duration) only; the few samples ``num_audio_frames``
  adds beyond duration * 16000 (e.g. 256 for 10 s) are zeros. A stream that covers up to
  ``AUDIO_SHORTFALL_S`` less of the range is zero-padded (AAC priming and container trimming lose a
  few 23 ms frames at the ends); more is ``too_short``.
* silence: a raw peak <= ``SILENCE_PEAK`` is ``silent``.

Every failure raises :class:`Rejected` with a typed reason and a message naming the file. Only the
needed range is decoded (seek to the keyframe before ``start``, one demux pass over both streams,
stop once both passed the end), and only the frames that are kept are scaled.
"""

from __future__ import annotations

import fractions
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from preprocessing.errors import Rejected, RejectReason
from selva.sequence import SequenceConfig

TRAIN_PEAK = 0.95
SILENCE_PEAK = 1e-6
MAX_PADDED_FRAMES = 3
AUDIO_SHORTFALL_S = 0.1
PTS_TOLERANCE_S = 1e-3
# swscale's bicubic is FFmpeg's ``scale`` default; at these downscale ratios it filters over the whole
# source footprint, so no aliasing (unlike a plain bicubic kernel).
INTERPOLATION = "BICUBIC"

MediaSource = str | os.PathLike[str] | BinaryIO

__all__ = ["DecodedClip", "MediaInfo", "StreamInfo", "decode_clip", "open_media", "probe"]


@dataclass(frozen=True)
class StreamInfo:
    index: int
    kind: str  # "video", "audio", "subtitle", "data", ...
    codec: str
    duration: float | None  # seconds, as the container states it
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    frames: int | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class MediaInfo:
    name: str
    format: str
    duration: float | None  # seconds
    size_bytes: int | None
    streams: tuple[StreamInfo, ...]

    def first(self, kind: str) -> StreamInfo | None:
        return next((s for s in self.streams if s.kind == kind), None)

    @property
    def video(self) -> StreamInfo | None:
        return self.first("video")

    @property
    def audio(self) -> StreamInfo | None:
        return self.first("audio")

    def stream_summary(self) -> str:
        kinds = [s.kind for s in self.streams]
        return "streams: " + (", ".join(kinds) if kinds else "none")


def probe_container(container: av.container.InputContainer, name: str, size: int | None) -> MediaInfo:
    streams = []
    for s in container.streams:
        ctx = s.codec_context
        common = dict(index=s.index, kind=s.type, codec=ctx.name if ctx is not None else "unknown")
        common["duration"] = float(s.duration * s.time_base) if s.duration is not None and s.time_base else None
        if s.type == "video" and ctx is not None:
            rate = s.average_rate or s.guessed_rate
            extra = dict(width=ctx.width, height=ctx.height, fps=float(rate) if rate else None, frames=s.frames or None)
        elif s.type == "audio" and ctx is not None:
            extra = dict(sample_rate=ctx.sample_rate, channels=ctx.channels)
        else:
            extra = {}
        streams.append(StreamInfo(**common, **extra))
    duration = container.duration / av.time_base if container.duration is not None else None
    return MediaInfo(name, container.format.name, duration, size, tuple(streams))


@dataclass
class DecodedClip:
    frames: np.ndarray  # (T, S, S, 3) uint8, RGB
    audio: np.ndarray  # (N,) float32, peak-normalised to TRAIN_PEAK
    peak: float  # raw peak of the mono 16 kHz audio before normalisation
    info: MediaInfo
    start: float
    duration: float
    fps: int
    sample_rate: int
    padded_frames: int  # output frames filled by repeating a neighbour
    padded_samples: int  # audio samples inside [start, start + duration) filled with zeros


def _name_of(source: MediaSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def _ffmpeg_reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def open_media(source: MediaSource, name: str | None = None) -> tuple[av.container.InputContainer, int | None]:
    """Open ``source`` for reading, turning every way it can fail into :class:`Rejected`.

    Returns the container and the file size in bytes (None for file objects).
    """
    label = _name_of(source, name)
    size: int | None = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise Rejected(RejectReason.MISSING_FILE, f"{label}: no such file")
        if not path.is_file():
            raise Rejected(RejectReason.MISSING_FILE, f"{label}: not a regular file")
        size = path.stat().st_size
        if size == 0:
            raise Rejected(RejectReason.UNDECODABLE, f"{label}: file is empty (0 bytes)")
        source = os.fspath(path)
    try:
        container = av.open(source, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as err:  # InvalidDataError is a ValueError
        raise Rejected(RejectReason.UNDECODABLE, f"{label}: cannot open as media: {_ffmpeg_reason(err)}") from None
    return container, size


def probe(source: MediaSource, name: str | None = None) -> MediaInfo:
    """Container and stream facts, without decoding; raises :class:`Rejected` if it cannot open."""
    label = _name_of(source, name)
    container, size = open_media(source, label)
    with container:
        return probe_container(container, label, size)


class _FramePicker:
    """Fills n output frames at times t0 + k/fps from source frames arriving in presentation order."""

    def __init__(self, t0: float, n: int, fps: int, size: int, threads: int = 0) -> None:
        self.targets = [t0 + k / fps for k in range(n)]
        self.out = np.empty((n, size, size, 3), dtype=np.uint8)
        self.size = size
        self.k = 0  # next output index to fill
        self.leading = 0  # outputs before the first source frame
        self.prev: av.VideoFrame | None = None
        self.prev_time = -np.inf
        self.prev_written = -1  # output index that already holds ``prev`` (convert each frame once)
        self.step = 1.0 / fps  # last seen frame interval: the fallback duration of the last frame
        self.reformatter = av.video.reformatter.VideoReformatter()
        self.threads = threads
        self.stream_error: str | None = None  # a decode error that ended the stream early (damaged tail)

    @property
    def done(self) -> bool:
        return self.k >= len(self.targets)

    def _emit(self) -> None:
        assert self.prev is not None
        if self.prev_written >= 0:
            self.out[self.k] = self.out[self.prev_written]
        else:
            rgb = self.reformatter.reformat(
                self.prev, width=self.size, height=self.size, format="rgb24", interpolation=INTERPOLATION,
                threads=self.threads,
            )
            self.out[self.k] = rgb.to_ndarray()
            self.prev_written = self.k
        self.k += 1

    def push(self, frame: av.VideoFrame) -> None:
        t = frame.time
        if t is None or t <= self.prev_time:  # no timestamp or out of order: cannot be placed
            return
        while not self.done and self.targets[self.k] + PTS_TOLERANCE_S < t:
            if self.prev is None:
                self.leading += 1
                self.k += 1
            else:
                self._emit()
        if self.prev is not None:
            self.step = t - self.prev_time
        self.prev, self.prev_time, self.prev_written = frame, t, -1

    def finish(self) -> None:
        """At end of stream: the last frame covers its own duration, no further."""
        if self.prev is None:
            return
        dur = self.prev.duration
        tb = self.prev.time_base
        length = float(dur * tb) if dur and tb else self.step
        while not self.done and self.targets[self.k] + PTS_TOLERANCE_S < self.prev_time + length:
            self._emit()

    @property
    def covered(self) -> int:
        return self.k - self.leading


class _AudioCollector:
    """Resamples decoded audio to mono float32 at ``rate``, on a sample grid anchored at ``origin``.

    After a seek the first decoded sample sits at an arbitrary source sample; resampling from there
    would put every output sample a fraction of a sample off the grid of a decode from the top (a
    0.1-sample shift is a ~0.03 error at 8 kHz). So the first frame is trimmed to the next source
    sample that coincides with an output sample (every 441 source samples = 10 ms for 44.1 kHz).
    """

    def __init__(self, rate: int, origin: float) -> None:
        self.rate = rate
        self.origin = origin
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        self.chunks: list[np.ndarray] = []
        self.first_time: float | None = None  # time of the first resampled sample

    def _align(self, frame: av.AudioFrame) -> av.AudioFrame | None:
        src_rate = frame.sample_rate
        index = int(round((frame.time - self.origin) * src_rate))
        skip = (-index) % (src_rate // math.gcd(src_rate, self.rate))
        if skip >= frame.samples:
            return None
        if skip:
            data = frame.to_ndarray()
            planar = frame.format.is_planar
            data = data[:, skip:] if planar else data[:, skip * len(frame.layout.channels) :]
            trimmed = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(data), format=frame.format.name, layout=frame.layout.name
            )
            trimmed.sample_rate = src_rate
            trimmed.time_base = fractions.Fraction(1, src_rate)
            trimmed.pts = index + skip
            frame = trimmed
        self.first_time = self.origin + (index + skip) / src_rate
        return frame

    def push(self, frame: av.AudioFrame | None) -> None:
        if frame is not None and self.first_time is None:
            if frame.time is None:  # no timestamp: cannot be placed on the clip's time line
                return
            frame = self._align(frame)
            if frame is None:
                return
        for out in self.resampler.resample(frame):
            self.chunks.append(out.to_ndarray().reshape(-1))

    def samples(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)


def _seek(container: av.container.InputContainer, stream: av.VideoStream, time: float) -> None:
    if time <= 0 or stream.time_base is None:
        return
    try:  # offset is in the stream's time base when a stream is given
        container.seek(int(time / stream.time_base), backward=True, stream=stream)
    except av.FFmpegError:
        container.seek(0, backward=True)  # unseekable: decode from the top, the range logic still holds


def _decode_range(
    container: av.container.InputContainer, origin: float, start: float, duration: float,
    n_frames: int, fps: int, frame_size: int, sample_rate: int, seek: bool, threads: int = 0,
) -> tuple[_FramePicker, _AudioCollector]:  # fmt: skip
    vstream, astream = container.streams.best("video"), container.streams.best("audio")
    assert vstream is not None and astream is not None
    # Slice threads only: frame threading (AUTO) can deadlock in avcodec_free_context when a decode
    # stops early and the container closes (seen in Ray workers; PyAV issues 909 and 367).
    vstream.thread_type = "SLICE"
    vstream.thread_count = threads  # 0: FFmpeg's automatic count; a one-CPU Ray worker asks for 1
    t0, t_end = origin + start, origin + start + duration
    if seek:
        _seek(container, vstream, t0)
    picker, audio = _FramePicker(t0, n_frames, fps, frame_size, threads), _AudioCollector(sample_rate, origin)
    audio_done = False
    try:
        for packet in container.demux(vstream, astream):
            if packet.stream is vstream:
                if picker.done:
                    continue
                for frame in packet.decode():
                    picker.push(frame)
            elif not audio_done:
                for frame in packet.decode():
                    audio.push(frame)
                    audio_done = audio_done or (frame.time is not None and frame.time >= t_end)
            if picker.done and audio_done:
                break
    except av.FFmpegError as err:
        if picker.prev is None:  # nothing decodable at all
            raise
        # A damaged tail (a truncated download): keep what decoded; the length checks decide.
        picker.stream_error = _ffmpeg_reason(err)
    picker.finish()
    audio.push(None)  # flush the resampler's delayed tail
    return picker, audio


def _check_video(picker: _FramePicker, label: str, start: float, duration: float, info: MediaInfo) -> int:
    n = len(picker.targets)
    missing = n - picker.covered
    if missing > MAX_PADDED_FRAMES or picker.covered == 0:
        ends = f" (the file lasts {info.duration:.2f} s)" if info.duration else ""
        if picker.stream_error:
            ends += f"; decoding stopped early: {picker.stream_error}"
        raise Rejected(
            RejectReason.TOO_SHORT,
            f"{label}: video has {picker.covered} frames from {start:.2f} s, {n} needed for {duration:g} s{ends}",
        )
    if picker.leading:
        picker.out[: picker.leading] = picker.out[picker.leading]
    if picker.k < n:
        picker.out[picker.k :] = picker.out[picker.k - 1]
    return missing


def _trim_audio(
    audio: _AudioCollector, label: str, origin: float, start: float, duration: float, total: int
) -> tuple[np.ndarray, int]:
    rate = audio.rate
    want = int(round(duration * rate))
    samples = audio.samples()
    first = audio.first_time if audio.first_time is not None else origin + start
    offset = int(round((origin + start - first) * rate))  # > 0: samples to drop; < 0: audio starts late
    lead = max(-offset, 0)
    body = samples[max(offset, 0) : max(offset, 0) + want - lead] if lead < want else samples[:0]
    shortfall = want - len(body)
    if shortfall > AUDIO_SHORTFALL_S * rate:
        raise Rejected(
            RejectReason.TOO_SHORT,
            f"{label}: audio has {len(body) / rate:.2f} s from {start:.2f} s, {duration:g} s needed",
        )
    waveform = np.zeros(total, dtype=np.float32)
    waveform[lead : lead + len(body)] = body
    return waveform, shortfall


def decode_clip(
    source: MediaSource,
    *,
    duration: float,
    frame_size: int,
    start: float = 0.0,
    sample_rate: int = 16_000,
    fps: int = 25,
    name: str | None = None,
    threads: int = 0,
) -> DecodedClip:
    """Decode [start, start + duration) of ``source`` into sync frames and training audio.

    Raises :class:`Rejected` (missing_file, undecodable, no_video, no_audio, too_short, silent).
    ``threads`` caps FFmpeg's decode and scale threads (0: automatic, one per core); a worker that
    owns one core should pass 1, or parallel workers oversubscribe the machine.
    """
    if duration <= 0 or start < 0 or frame_size <= 0:
        raise ValueError(f"need duration > 0, start >= 0, frame_size > 0; got {duration}, {start}, {frame_size}")
    label = _name_of(source, name)
    seq = SequenceConfig(duration, sampling_rate=sample_rate, sync_frame_rate=fps)
    container, size = open_media(source, label)
    with container:
        info = probe_container(container, label, size)
        if container.streams.best("video") is None:
            raise Rejected(RejectReason.NO_VIDEO, f"{label}: no video stream ({info.stream_summary()})")
        if container.streams.best("audio") is None:
            raise Rejected(RejectReason.NO_AUDIO, f"{label}: no audio stream ({info.stream_summary()})")
        origin = container.start_time / av.time_base if container.start_time is not None else 0.0
        args = (origin, start, duration, seq.sync_num_frames, fps, frame_size, sample_rate)
        try:
            picker, audio = _decode_range(container, *args, seek=start > 0, threads=threads)
            late_audio = audio.first_time is not None and audio.first_time > origin + start + PTS_TOLERANCE_S
            if start > 0 and (picker.leading or late_audio):
                # the seek landed after ``start`` (a bad index): decode again from the top
                container.seek(0, backward=True)
                picker, audio = _decode_range(container, *args, seek=False, threads=threads)
        except av.FFmpegError as err:
            raise Rejected(RejectReason.UNDECODABLE, f"{label}: decoding failed: {_ffmpeg_reason(err)}") from None
    padded_frames = _check_video(picker, label, start, duration, info)
    waveform, padded_samples = _trim_audio(audio, label, origin, start, duration, seq.num_audio_frames)
    peak = float(np.max(np.abs(waveform)))
    if not peak > SILENCE_PEAK:  # also catches NaN
        raise Rejected(RejectReason.SILENT, f"{label}: audio is silent from {start:.2f} s (peak {peak:.2e})")
    waveform *= np.float32(TRAIN_PEAK / peak)
    return DecodedClip(
        picker.out, waveform, peak, info, start, duration, fps, sample_rate, padded_frames, padded_samples
    )
