"""Decode a time range of a media file into the model's inputs, with PyAV (DESIGN §3, §6).

Opening and probing (what a file holds, which stream is the video) is :mod:`preprocessing.media_probe`;
per-stream decode rules are :mod:`preprocessing.media_video` and :mod:`preprocessing.media_audio`.

``decode_clip`` turns the time range [start, start + duration) of a video file into

* sync frames: 25 fps, squashed (both axes resized, no crop) to ``frame_size``, uint8 (T, S, S, 3),
  T = ``SequenceConfig(duration).sync_num_frames`` exactly;
* audio: mono float32 at ``sample_rate`` (16 kHz, or 44.1 kHz for the 44.1 kHz presets) of exactly
  ``SequenceConfig(duration, sample_rate, spectrogram_frame_rate).num_audio_frames`` samples,
  peak-normalised to 0.95 (the raw peak is kept).

Rules (module constants, so tests and docs can name them):

* time line: ``start`` counts from the container's start time (an MPEG-TS file's clock often starts
  at 1.4 s, a program stream's at 0.5 s; mp4 edit lists are applied), in every container FFmpeg reads.
* frame selection: output frame k shows the last source frame whose pts <= start + k/25 (+ 1 ms of
  tolerance for millisecond time bases): 30 -> 25 fps and variable frame rates alike.
* orientation: a display matrix (phone clips) is applied as a player applies it: the frame comes out
  rotated / mirrored, snapped to the nearest of the 8 axis-aligned orientations (rule and reasons in
  :mod:`preprocessing.orientation`); ``DecodedClip.orientation`` and ``StreamInfo.orientation`` say which.
* video stream: the first video stream that is not an attached picture (cover art in m4a/mp3, an
  image attachment in mkv: FFmpeg's ``attached_pic`` disposition), a default-flagged one first. Cover
  art is listed with kind ``attached_pic``; a file with nothing else is ``no_video``. A real video
  stream that holds one still picture is ``too_short``, with a message that says so.
* video padding: up to ``MAX_PADDED_FRAMES`` output frames that no source frame covers (before the
  first or after the last frame's end) repeat the nearest real frame; more is ``too_short``.
* audio: samples are taken from [start, start + duration) only; the few samples ``num_audio_frames``
  adds beyond duration * 16000 (e.g. 256 for 10 s) are zeros. A stream that covers up to
  ``AUDIO_SHORTFALL_S`` less of the range is zero-padded (AAC priming and container trimming lose a
  few 23 ms frames at the ends); more is ``too_short``. Format changes mid-stream (48 kHz stereo then
  44.1 kHz mono) and timestamp gaps are handled by :mod:`preprocessing.media_audio`: every part is
  resampled to 16 kHz mono and placed by its timestamps.
* silence: a raw peak <= ``SILENCE_PEAK`` is ``silent``.

Every failure raises :class:`Rejected` with a typed reason and a message naming the file. Only the
needed range is decoded: seek to ``SEEK_BACKOFF_S[0]`` before ``start`` (the keyframe at or before
it), one demux pass over both streams, stop once both passed the end; only the frames that are kept
are scaled. A seek has landed well when the first decodable video frame (frames before the first
keyframe after a seek are dropped: they are undecodable or grey garbage) is at or before ``start``
and the audio begins ``AUDIO_PREROLL_S`` before it (decoder and resampler warm-up lies outside the
range). Otherwise (MPEG-TS and program streams seek to any packet, not to keyframes; a bad index)
the file is reopened with fresh decoders and the next, earlier seek of ``SEEK_BACKOFF_S`` is tried,
then decoding from the top: the result equals decoding from the top and dropping what precedes
``start``, while an hours-long file still costs a seek.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import av
import numpy as np

from preprocessing.errors import Rejected, RejectReason
from preprocessing.faults import is_transient
from preprocessing.media_audio import AUDIO_SHORTFALL_S, AudioCollector, place_audio
from preprocessing.media_probe import (
    IO_TIMEOUT_S,
    MediaInfo,
    MediaSource,
    StreamInfo,
    ffmpeg_reason,
    media_label,
    open_media,
    probe,
    probe_container,
    video_stream,
)
from preprocessing.media_video import INTERPOLATION, MAX_PADDED_FRAMES, PTS_TOLERANCE_S, FramePicker, check_video
from preprocessing.orientation import IDENTITY, Orientation
from selva.sequence import SequenceConfig

TRAIN_PEAK = 0.95
SILENCE_PEAK = 1e-6
SEEK_BACKOFF_S = (0.5, 4.0, 30.0)  # seconds before start each seek aims at, in turn; then the top
AUDIO_PREROLL_S = 0.1  # after a seek, audio must begin this long before start

# MediaInfo, StreamInfo, open_media, probe and video_stream live in preprocessing.media_probe and stay
# importable from here: decode_clip's result carries a MediaInfo, and callers probe and decode together.
__all__ = [
    "AUDIO_SHORTFALL_S", "INTERPOLATION", "MAX_PADDED_FRAMES", "PTS_TOLERANCE_S", "DecodedClip", "MediaInfo",
    "StreamInfo", "decode_clip", "open_media", "probe", "video_stream",
]  # fmt: skip


@dataclass
class DecodedClip:
    frames: np.ndarray  # (T, S, S, 3) uint8, RGB
    audio: np.ndarray  # (N,) float32, peak-normalised to TRAIN_PEAK; empty when decoded with_audio=False
    peak: float  # raw peak of the mono 16 kHz audio before normalisation
    info: MediaInfo
    start: float
    duration: float
    fps: int
    sample_rate: int
    padded_frames: int  # output frames filled by repeating a neighbour
    padded_samples: int  # audio samples inside [start, start + duration) filled with zeros
    orientation: Orientation = IDENTITY  # display transform applied to the frames (of the first kept frame)


def _seek(container: av.container.InputContainer, stream: av.VideoStream, time: float) -> None:
    try:  # offset is in the stream's time base when a stream is given
        # clamped: a start far past any file (1e15 s) must not overflow FFmpeg's int64 timestamps
        container.seek(min(int(time / stream.time_base), 2**62), backward=True, stream=stream)
    except (av.FFmpegError, OverflowError):
        container.seek(0, backward=True)  # unseekable: decode from the top, the range logic still holds


def _decode_range(
    container: av.container.InputContainer, origin: float, t0: float, t_end: float, n_frames: int, fps: int,
    frame_size: int, sample_rate: int, seek_to: float | None, threads: int, with_audio: bool = True,
) -> tuple[FramePicker, AudioCollector | None]:  # fmt: skip
    """One pass over [t0, t_end) (container clock) on a freshly opened container; seeks to ``seek_to`` first.
    ``with_audio=False``: the video stream alone is demuxed and no audio collected (None)."""
    vstream = video_stream(container)
    astream = container.streams.best("audio") if with_audio else None
    assert vstream is not None and (astream is not None or not with_audio)
    # Slice threads only: frame threading (AUTO) can deadlock in avcodec_free_context when a decode
    # stops early and the container closes (seen in Ray workers; PyAV issues 909 and 367). Set before
    # the codec opens, hence a fresh container for every pass.
    vstream.thread_type = "SLICE"
    vstream.thread_count = threads  # 0: FFmpeg's automatic count; a one-CPU Ray worker asks for 1
    if seek_to is not None and vstream.time_base is not None:
        _seek(container, vstream, seek_to)
    picker = FramePicker(t0, n_frames, fps, frame_size, threads, need_key=seek_to is not None)
    audio: AudioCollector | None = None
    if astream is not None:
        first_audio = astream.start_time * astream.time_base if astream.start_time is not None else None
        audio = AudioCollector(
            sample_rate, origin, float(first_audio) if first_audio is not None else None,
            astream.codec_context.frame_size,
        )
    audio_done = audio is None
    try:
        for packet in container.demux(*[s for s in (vstream, astream) if s is not None]):
            if packet.stream is vstream:
                if picker.done:
                    continue
                if picker.need_key and picker.key_time is None and packet.is_keyframe:
                    stamp = packet.pts if packet.pts is not None else packet.dts
                    if stamp is not None:
                        picker.key_time = float(stamp * packet.time_base)
                for frame in packet.decode():
                    picker.push(frame)
            elif audio is not None and not audio_done:
                for frame in packet.decode():
                    audio.push(frame)
                    audio_done = audio_done or (frame.time is not None and frame.time >= t_end)
            if picker.done and audio_done:
                break
    except av.FFmpegError as err:
        if picker.prev is None or is_transient(err):  # nothing decodable at all, or the storage failed
            raise
        # A damaged tail (a truncated download): keep what decoded; the length checks decide.
        picker.stream_error = ffmpeg_reason(err)
    picker.finish()
    if audio is not None:
        audio.push(None)  # flush the resampler's delayed tail
    return picker, audio


def _landed(picker: FramePicker, audio: AudioCollector | None, t0: float) -> bool:
    """Whether a pass that began with a seek saw everything a decode from the top would at t0."""
    video_ok = picker.first_time is not None and picker.first_time <= t0 + PTS_TOLERANCE_S
    audio_ok = audio is None or (audio.first_time is not None and audio.first_time <= t0 - AUDIO_PREROLL_S)
    return video_ok and audio_ok and picker.stream_error is None  # an error after a seek: try earlier


def _reopen(source: MediaSource, label: str, io_timeout_s: float) -> av.container.InputContainer | None:
    """A fresh container (fresh demuxer and decoders) on ``source``; None for an unseekable file object."""
    if not isinstance(source, (str, os.PathLike)):
        try:
            source.seek(0)
        except (AttributeError, OSError, ValueError):
            return None
    return open_media(source, label, io_timeout_s)[0]


def decode_clip(
    source: MediaSource,
    *,
    duration: float,
    frame_size: int,
    start: float = 0.0,
    sample_rate: int = 16_000,
    spectrogram_frame_rate: int = 256,
    fps: int = 25,
    name: str | None = None,
    threads: int = 0,
    io_timeout_s: float = IO_TIMEOUT_S,
    with_audio: bool = True,
) -> DecodedClip:
    """Decode [start, start + duration) of ``source`` into sync frames and training audio.

    ``with_audio=False`` is generation's path (a silent or audio-less video is its normal input): the
    same frame logic, the audio stream neither needed nor decoded; ``audio`` is then empty and
    ``peak`` 0.

    ``sample_rate`` and ``spectrogram_frame_rate`` (the mel hop) are the model preset's audio rates:
    16 kHz / 256 or 44.1 kHz / 512; the audio is resampled to ``sample_rate`` and padded to whole latents.

    ``start`` and ``duration`` are seconds on the file's own time line, counted from the container's
    start time. Raises :class:`Rejected` (missing_file, undecodable, no_video, no_audio, too_short,
    silent); a storage or network fault (``preprocessing.faults.is_transient``) is raised as it is.
    ``threads`` caps FFmpeg's decode and scale threads (0: automatic, one per core); a worker
    that owns one core should pass 1, or parallel workers oversubscribe the machine. A URL read that
    waits more than ``io_timeout_s`` seconds fails as a storage fault (a server that never answers).
    """
    if duration <= 0 or start < 0 or frame_size <= 0:
        raise ValueError(f"need duration > 0, start >= 0, frame_size > 0; got {duration}, {start}, {frame_size}")
    label = media_label(source, name)
    seq = SequenceConfig(duration, sampling_rate=sample_rate, spectrogram_frame_rate=spectrogram_frame_rate,
                         sync_frame_rate=fps)
    container: av.container.InputContainer | None
    container, size = open_media(source, label, io_timeout_s)
    try:
        info = probe_container(container, label, size)
        if info.video is None:
            raise Rejected(RejectReason.NO_VIDEO, f"{label}: no video stream ({info.stream_summary()})")
        if with_audio and container.streams.best("audio") is None:
            raise Rejected(RejectReason.NO_AUDIO, f"{label}: no audio stream ({info.stream_summary()})")
        origin = container.start_time / av.time_base if container.start_time is not None else 0.0
        t0, t_end = origin + start, origin + start + duration
        args = (origin, t0, t_end, seq.sync_num_frames, fps, frame_size, sample_rate)
        tries: list[float | None] = [t0 - back for back in SEEK_BACKOFF_S if start > back]
        result: tuple[FramePicker, AudioCollector] | None = None
        error = "no pass decoded"
        for attempt, seek_to in enumerate([*tries, None]):
            if attempt:  # a decoder that has run cannot be reconfigured or trusted: start afresh
                container.close()
                container = None
                container = _reopen(source, label, io_timeout_s)
                if container is None:  # an unseekable file object: keep what the first pass found
                    break
            try:
                result = _decode_range(container, *args, seek_to=seek_to, threads=threads, with_audio=with_audio)
            except av.FFmpegError as err:  # after a seek: it landed on something undecodable, try earlier
                if is_transient(err):  # not the file's fault: the caller decides whether to retry
                    raise
                result, error = None, ffmpeg_reason(err)
                continue
            if seek_to is None or _landed(*result, t0):
                break
    finally:
        if container is not None:
            container.close()
    if result is None:
        raise Rejected(RejectReason.UNDECODABLE, f"{label}: decoding failed: {error}")
    picker, audio = result
    padded_frames = check_video(picker, label, start, duration, info.duration)
    orientation = picker.orientation or IDENTITY
    info = info.with_orientation(info.video.index, orientation)
    if audio is None:
        return DecodedClip(picker.out, np.zeros(0, np.float32), 0.0, info, start, duration, fps, sample_rate,
                           padded_frames, 0, orientation)
    waveform, padded_samples = place_audio(audio, label, t0, start, duration, seq.num_audio_frames)
    peak = float(np.max(np.abs(waveform)))
    if not peak > SILENCE_PEAK:  # also catches NaN
        raise Rejected(RejectReason.SILENT, f"{label}: audio is silent from {start:.2f} s (peak {peak:.2e})")
    waveform *= np.float32(TRAIN_PEAK / peak)
    return DecodedClip(
        picker.out, waveform, peak, info, start, duration, fps, sample_rate, padded_frames, padded_samples, orientation
    )
