"""A video's time span with a new audio track: the ``NAME.mp4`` that ``selva generate`` writes.

The picture is the input's own, over [start, start + duration) of its time line (counted from the
container's start time, as :func:`preprocessing.media.decode_clip` counts):

* **copied** (packets unchanged, no quality loss) when the cut allows it: the span starts on a
  keyframe (within ``COPY_TOLERANCE_S``), the packets of the span need no frame outside it (decode
  order equals display order: no B-frames reaching across the cut) and the stream has no display
  rotation (a copied stream would lose it here, and a player would show the phone clip sideways);
* otherwise **re-encoded**: every source frame of the span, turned as a player shows it, encoded with
  H.264 (``preprocessing.compact.video_encoder``; CRF ``REENCODE_CRF``) at its own size (odd sizes
  padded by one pixel: yuv420p needs even ones) and its own timestamps (variable frame rates kept).

The audio track is ALAC, lossless: its samples equal the 16-bit PCM of the FLAC written beside it
(FLAC in MP4 does not mux with this FFmpeg; AAC would not equal the FLAC). Players that do not take
ALAC (browsers) can use the FLAC. Written to a temporary name and renamed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from preprocessing.compact import FLAC_SCALE, video_encoder
from preprocessing.media_probe import media_label, open_media, video_stream
from preprocessing.orientation import from_frame

COPY_TOLERANCE_S = 0.001  # a span "starts on a keyframe" when they are this close (millisecond time bases)
REENCODE_CRF = 18  # visually transparent for H.264
AUDIO_FRAME = 4096  # samples per ALAC frame (its default)
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
    # the FLAC's quantisation (preprocessing.compact.encode_flac), so both files hold the same samples
    pcm = np.clip(np.round(np.clip(audio, -1.0, 1.0).astype(np.float64) * FLAC_SCALE), -32768, 32767).astype(np.int16)
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
    if stream.codec_context.name == "libx264":
        stream.codec_context.options = {"crf": str(REENCODE_CRF), "preset": "veryfast"}
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
        out = av.open(str(tmp), "w", format="mp4")
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
            for time, rgb in frames:
                picture = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
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
