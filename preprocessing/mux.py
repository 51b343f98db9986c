"""mp4 files with a sound track: a video's span with new audio, and frames with audio encoded anew.

**mux_span_with_audio** writes the ``NAME.mp4`` of ``selva generate``: the picture is the input's
own, over [start, start + duration) of its time line (counted from the container's start time, as
:func:`preprocessing.media.decode_clip` counts):

* **copied** (packets unchanged, no quality loss) when the cut allows it: the span starts on a
  keyframe (within ``COPY_TOLERANCE_S``), the packets of the span need no frame outside it (decode
  order equals display order: no B-frames reaching across the cut) and the stream has no display
  rotation (a copied stream would lose it here, and a player would show the phone clip sideways);
* otherwise **re-encoded**: every source frame of the span, turned as a player shows it, encoded with
  H.264 (``sync.mp4``'s encoder and settings at CRF ``REENCODE_CRF``) at its own size (odd sizes
  padded by one pixel: yuv420p needs even ones) and its own timestamps (variable frame rates kept).

The audio track is ALAC, lossless: its samples equal the 16-bit PCM of the FLAC written beside it
(FLAC in MP4 does not mux with this FFmpeg; AAC would not equal the FLAC). Players that do not take
ALAC (browsers) can use the FLAC. Written to a temporary name and renamed.

**encode_av_mp4** encodes uint8 RGB frames and a waveform in memory: a benchmark composite (two clips
side by side that a person watches and hears). Its picture is coded exactly like ``sync.mp4``
(``preprocessing.compact``: the same encoder, options and bit-exact RGB->yuv420p), so what a model
decodes from either follows the same rules; its audio is AAC-LC mono at the waveform's rate, what
every player plays. AAC is lossy: that track is for listening and for baselines that read a video's
audio, never a reference for metrics (the benchmark keeps references as FLAC).

Both are reproducible: FFmpeg's ``bitexact`` flags on the muxer and encoders (no version strings, no
creation times) and ``sync.mp4``'s encoder settings, so the same inputs give the same bytes on a rerun.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from preprocessing.compact import (
    BITEXACT_MUXER,
    SYNC_CRF,
    SYNC_PRESET,
    configure_encoder,
    default_float_env,
    pcm16,
    to_yuv420p,
    video_encoder,
)
from preprocessing.media_probe import media_label, open_media, video_stream
from preprocessing.orientation import from_frame

COPY_TOLERANCE_S = 0.001  # a span "starts on a keyframe" when they are this close (millisecond time bases)
REENCODE_CRF = 18  # visually transparent for H.264
AUDIO_FRAME = 4096  # samples per ALAC frame (its default)
AAC_BITRATE = 96_000  # bits/s for 16 kHz mono: transparent enough to listen to, ~100 KB per 8 s
AAC_FRAME = 1024  # samples per AAC frame; audio is handed to the encoder in such chunks
_TIME_BASE = Fraction(1, 90_000)  # re-encoded frames keep their source times at this resolution


@dataclass(frozen=True)
class MuxResult:
    path: Path
    video_copied: bool
    reason: str  # why the video was re-encoded ("" when copied)
    frames: int  # video frames written


def _span_packets(container: av.container.InputContainer, stream: av.VideoStream, t0: float, t_end: float) -> list:
    """The packets whose display time lies in [t0, t_end), in decode order (from the top of the file)."""
    kept = []
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        time = float(packet.pts * packet.time_base)
        if time >= t_end + 5.0:  # far past the span: no packet of it can follow in decode order
            break
        if t0 - COPY_TOLERANCE_S <= time < t_end - COPY_TOLERANCE_S:
            kept.append(packet)
    return kept


def _copy_problem(packets: list, t0: float, rotated: bool) -> str:
    if rotated:
        return "the stream has a display rotation"
    if not packets:
        return "no video packet in the span"
    first = packets[0]
    if not first.is_keyframe or abs(float(first.pts * first.time_base) - t0) > COPY_TOLERANCE_S:
        return "the span does not start on a keyframe"
    pts = [p.pts for p in packets]
    if pts != sorted(pts):
        return "frames of the span are stored out of display order (B-frames)"
    return ""


def _write_audio(out: av.container.OutputContainer, stream: av.AudioStream, audio: np.ndarray, rate: int) -> None:
    pcm = pcm16(audio)  # the FLAC's quantisation, so both files hold the same samples
    for begin in range(0, len(pcm), AUDIO_FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[None, begin : begin + AUDIO_FRAME], format="s16", layout="mono")
        frame.sample_rate, frame.pts = rate, begin
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def _span_frames(source: str, t0: float, t_end: float) -> Iterator[tuple[float, np.ndarray]]:
    """(time, RGB (H, W, 3) uint8 as a player shows it, sizes made even) of every frame in [t0, t_end)."""
    container = av.open(source)
    try:
        vstream = video_stream(container)
        assert vstream is not None
        for frame in container.decode(vstream):
            if frame.time is None or frame.time < t0 - COPY_TOLERANCE_S:
                continue
            if frame.time >= t_end - COPY_TOLERANCE_S:
                break
            rgb = from_frame(frame).apply(frame.to_ndarray(format="rgb24"))
            height, width = rgb.shape[0] + rgb.shape[0] % 2, rgb.shape[1] + rgb.shape[1] % 2
            if rgb.shape[:2] != (height, width):  # yuv420p needs even sizes: repeat the last row/column
                rgb = np.pad(rgb, ((0, height - rgb.shape[0]), (0, width - rgb.shape[1]), (0, 0)), mode="edge")
            yield float(frame.time), np.ascontiguousarray(rgb)
    finally:
        container.close()


def _encoder_stream(out: av.container.OutputContainer, shape: tuple[int, ...], rate: Fraction | None) -> av.VideoStream:
    stream = out.add_stream(video_encoder(), rate=rate or 25)
    stream.height, stream.width = shape[0], shape[1]
    stream.pix_fmt, stream.time_base = "yuv420p", _TIME_BASE
    configure_encoder(stream.codec_context, REENCODE_CRF, SYNC_PRESET)
    return stream


def mux_span_with_audio(
    source: str | os.PathLike, out_path: str | os.PathLike, *, start: float, duration: float, audio: np.ndarray,
    sample_rate: int,
) -> MuxResult:
    """Write ``out_path`` (mp4): ``source``'s picture over [start, start + duration) s and ``audio``
    ((N,) float in [-1, 1] at ``sample_rate``) as its only audio track. Raises ``ValueError`` when the
    span holds no video frame, FFmpeg errors for an unreadable source."""
    source, out_path = str(source), Path(out_path)
    label = media_label(source, None)
    container, _ = open_media(source, label, 30.0)
    try:
        vstream = video_stream(container)
        if vstream is None:
            raise ValueError(f"{label}: no video stream")
        origin = container.start_time / av.time_base if container.start_time is not None else 0.0
        t0, t_end = origin + start, origin + start + duration
        packets = _span_packets(container, vstream, t0, t_end)
        problem = _copy_problem(packets, t0, _turned(packets))
        tmp = out_path.with_name(out_path.name + ".tmp")
        out = av.open(str(tmp), "w", format="mp4", options=BITEXACT_MUXER)
        try:
            # every stream is added before the first packet is muxed
            if not problem:
                video = out.add_stream_from_template(vstream)
                frames = iter(())
            else:
                frames = _span_frames(source, t0, t_end)
                first = next(frames, None)
                if first is None:
                    raise ValueError(f"{label}: no video frame in [{start:g}, {start + duration:g}) s")
                video = _encoder_stream(out, first[1].shape, vstream.average_rate)
                frames = itertools.chain([first], frames)
            sound = out.add_stream("alac", rate=sample_rate, layout="mono")
            count = 0
            if not problem:
                zero = packets[0].pts
                for packet in packets:
                    packet.pts = packet.pts - zero
                    packet.dts = packet.dts - zero if packet.dts is not None else None
                    packet.stream = video
                    out.mux(packet)
                count = len(packets)
            reformatter = av.video.reformatter.VideoReformatter()
            for time, rgb in frames:
                picture = to_yuv420p(reformatter, rgb)
                picture.pts, picture.time_base = round((time - t0) / _TIME_BASE), _TIME_BASE
                for packet in video.encode(picture):
                    out.mux(packet)
                count += 1
            if problem:
                for packet in video.encode(None):
                    out.mux(packet)
            _write_audio(out, sound, audio, sample_rate)
        finally:
            out.close()
    except BaseException:
        Path(str(out_path) + ".tmp").unlink(missing_ok=True)
        raise
    finally:
        container.close()
    tmp.replace(out_path)
    return MuxResult(out_path, not problem, problem, count)


def _turned(packets: list) -> bool:
    """Whether the span's first frame carries a display matrix that turns or mirrors it (FFmpeg hands
    the matrix to decoded frames; decoding the keyframe alone is enough)."""
    if not packets or not packets[0].is_keyframe:
        return False  # no copy anyway
    try:
        frames = packets[0].decode()
    except av.FFmpegError:
        return True  # undecodable on its own: re-encoding will say what is wrong
    return bool(frames) and not from_frame(frames[0]).is_identity


def encode_av_mp4(
    frames: np.ndarray, audio: np.ndarray, *, fps: int = 25, sample_rate: int = 16_000, crf: int = SYNC_CRF
) -> bytes:
    """Encode uint8 RGB frames (T, H, W, 3) and a mono float waveform (N,) in [-1, 1] as one mp4.

    H and W must be even (yuv420p). Video frame k has pts k/fps; the audio starts at 0 s. The
    two tracks are interleaved by time, as players expect.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames (T, H, W, 3) with T > 0, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"expected a non-empty mono waveform (N,), got shape {audio.shape}")
    peak = float(np.max(np.abs(audio)))
    if not np.isfinite(peak) or peak > 1.0:
        raise ValueError(f"audio must be finite and within [-1, 1] (peak {peak})")

    buf = io.BytesIO()
    with default_float_env(), av.open(buf, mode="w", format="mp4", options=BITEXACT_MUXER) as out:
        vstream = out.add_stream(video_encoder(), rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        configure_encoder(vstream.codec_context, crf, SYNC_PRESET)
        astream = out.add_stream("aac", rate=sample_rate, layout="mono")
        astream.bit_rate = AAC_BITRATE
        astream.codec_context.flags |= av.codec.context.Flags.bitexact
        reformatter = av.video.reformatter.VideoReformatter()
        next_sample = 0
        for i, rgb in enumerate(frames):
            # write the audio that starts before this frame's time first, so the tracks interleave
            while next_sample < audio.size and Fraction(next_sample, sample_rate) <= Fraction(i, fps):
                chunk = audio[next_sample : next_sample + AAC_FRAME]
                out.mux(astream.encode(_audio_frame(chunk, next_sample, sample_rate)))
                next_sample += chunk.size
            frame = to_yuv420p(reformatter, rgb)
            frame.pts = i
            out.mux(vstream.encode(frame))
        while next_sample < audio.size:
            chunk = audio[next_sample : next_sample + AAC_FRAME]
            out.mux(astream.encode(_audio_frame(chunk, next_sample, sample_rate)))
            next_sample += chunk.size
        out.mux(vstream.encode(None))
        out.mux(astream.encode(None))
    return buf.getvalue()


def _audio_frame(chunk: np.ndarray, first: int, sample_rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = first
    frame.time_base = Fraction(1, sample_rate)
    return frame
