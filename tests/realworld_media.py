"""Real-world media variants for tests, written with PyAV: each builder returns the path it wrote.

:func:`make_oriented_clip` (a display matrix, as phones write it; :func:`display_matrix`,
:func:`marker_corners`), :func:`make_timeline_clip` (MPEG-TS, program stream, mkv, webm, avi, ... with
a clock that starts late and optionally a single keyframe), :func:`make_format_change_ts` (TS parts
with different audio formats joined byte for byte), :func:`make_cover_art_file` (m4a / mp3 / mkv
cover art) and :func:`make_still_picture_clip`. Frames use ``media_fixtures.frame_level``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from media_fixtures import frame_level, sine

MARKER_RED = (255, 0, 0)
MARKER_GREEN = (0, 255, 0)
BACKGROUND_LEVEL = 128
AUDIO_DELAY_S = 0.05  # audio starts this long after the video, so its encoder priming never moves the origin
BURST_HZ, BURST_S = 1000.0, 0.02

_FORMATS = {  # suffix -> (muxer, video encoder, audio encoder)
    ".mp4": ("mp4", "libx264", "aac"),
    ".mov": ("mov", "libx264", "aac"),
    ".mkv": ("matroska", "libx264", "aac"),
    ".flv": ("flv", "libx264", "aac"),
    ".ts": ("mpegts", "libx264", "aac"),
    ".m2ts": ("mpegts", "libx264", "aac"),
    ".mpg": ("mpeg", "mpeg2video", "mp2"),
    ".vob": ("vob", "mpeg2video", "mp2"),
    ".webm": ("webm", "libvpx", "libopus"),
    ".avi": ("avi", "mpeg4", "pcm_s16le"),
}


def marked_picture(size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """(H, W, 3) grey picture, a red block in the top-left corner and a green one in the top-right.

    Each block is a quarter of the width by a quarter of the height, so after any orientation and a
    squash to S x S it fills an S/4 x S/4 corner: see :func:`marker_corners`.
    """
    width, height = size
    img = np.full((height, width, 3), BACKGROUND_LEVEL, np.uint8)
    img[: height // 4, : width // 4] = MARKER_RED
    img[: height // 4, width - width // 4 :] = MARKER_GREEN
    return img


def marker_corners(frame: np.ndarray) -> tuple[str | None, str | None]:
    """Where the red and the green marker are in a decoded (S, S, 3) frame: "tl", "tr", "bl", "br" or None."""
    s = frame.shape[0]
    q = s // 4
    found: dict[str, str | None] = {"red": None, "green": None}
    for name, (rows, cols) in {
        "tl": (slice(0, q), slice(0, q)), "tr": (slice(0, q), slice(s - q, s)),
        "bl": (slice(s - q, s), slice(0, q)), "br": (slice(s - q, s), slice(s - q, s)),
    }.items():  # fmt: skip
        centre = frame[rows, cols][q // 4 : q - q // 4, q // 4 : q - q // 4].reshape(-1, 3).mean(axis=0)
        for colour, rgb in (("red", MARKER_RED), ("green", MARKER_GREEN)):
            if np.abs(centre - np.array(rgb)).max() < 60:
                found[colour] = name
    return found["red"], found["green"]


def display_matrix(rotate_cw: float = 0.0, *, hflip: bool = False, vflip: bool = False, scale: float = 1.0):
    """FFmpeg's 9-int32 display matrix: turn the picture ``rotate_cw`` degrees clockwise, then mirror.

    Written from the definition (x' = a*x + c*y, y' = b*x + d*y, x right, y down, 16.16 fixed point),
    independently of PyAV's helpers; ``hflip`` mirrors left-right, ``vflip`` top-bottom, after the turn.
    """
    theta = np.radians(rotate_cw)
    a, b, c, d = np.cos(theta) * scale, np.sin(theta) * scale, -np.sin(theta) * scale, np.cos(theta) * scale
    if hflip:
        a, c = -a, -c
    if vflip:
        b, d = -b, -d
    fixed = [round(v * 65536) for v in (a, b, c, d)]
    return (fixed[0], fixed[1], 0, fixed[2], fixed[3], 0, 0, 0, 1 << 30)


def make_oriented_clip(
    path: str | Path,
    matrix: Sequence[int] | None,
    *,
    seconds: float = 1.2,
    fps: int = 25,
    size: tuple[int, int] = (64, 48),
    sample_rate: int = 44100,
) -> Path:
    """A phone-style clip: every frame is :func:`marked_picture` as coded, with ``matrix`` as display matrix.

    Container from the suffix (.mp4 and .mov write it in the ``tkhd`` box, as phones do; .mkv as a
    projection pose, rotations only). H.264 + AAC sine. E.g. ``display_matrix(90)``: a player shows the
    red marker top-right and the green one bottom-right.
    """
    path = Path(path)
    muxer, vcodec, acodec = _FORMATS[path.suffix]
    with av.open(str(path), mode="w", format=muxer) as out:
        vstream = _video_stream(out, vcodec, fps, size, keyint=fps)
        if matrix is not None:
            vstream.set_display_matrix(list(matrix))
        astream = out.add_stream(acodec, rate=sample_rate, layout="stereo")
        picture = marked_picture(size)
        _write_av(out, vstream, astream, seconds, fps, lambda i: picture, _sine_source(sample_rate))
    return path


def make_timeline_clip(
    path: str | Path,
    seconds: float,
    *,
    fps: int = 25,
    start_offset: float = 1.4,
    keyint: int | None = 12,
    size: tuple[int, int] = (64, 48),
    sample_rate: int = 48000,
) -> Path:
    """A clip whose clock starts at ``start_offset`` s, in the container the suffix names.

    .ts/.m2ts: MPEG-TS, H.264 + AAC; .mpg/.vob: MPEG program stream, MPEG-2 + MP2 (the muxer adds its
    own 0.5 s); .mkv/.mp4/.mov/.flv: H.264 + AAC; .webm: VP8 + Opus (48 kHz); .avi: MPEG-4 + PCM (an
    AVI clock always starts at 0: ``start_offset`` is ignored).
    Source frame i (grey level :func:`frame_level`) is shown from ``start_offset + i / fps``; the audio
    is the fixture sine from ``start_offset + AUDIO_DELAY_S``. A keyframe every ``keyint`` frames, or
    only the first one with ``keyint=None``. So for TS/PS/mkv the container starts with frame 0, and a
    clip from ``start`` shows frame ``round(start * fps) + k`` at output frame k (25 fps).
    """
    path = Path(path)
    muxer, vcodec, acodec = _FORMATS[path.suffix]
    if acodec == "libopus":
        sample_rate = 48000
    if muxer == "avi":  # AVI counts frames and samples from 0: it cannot start the clock later
        start_offset = 0.0
    with av.open(str(path), mode="w", format=muxer) as out:
        vstream = _video_stream(out, vcodec, fps, size, keyint=keyint)
        astream = out.add_stream(acodec, rate=sample_rate, layout="stereo")
        _write_av(
            out, vstream, astream, seconds, fps, lambda i: np.full((size[1], size[0], 3), frame_level(i), np.uint8),
            _sine_source(sample_rate), offset=start_offset,
        )  # fmt: skip
    return path


def make_format_change_ts(
    path: str | Path,
    parts: Sequence[tuple[int, int, float]] = ((48000, 2, 1.5), (44100, 1, 1.5)),
    *,
    fps: int = 25,
    start_offset: float = 1.4,
    burst_at: float = 0.5,
    burst_s: float = BURST_S,
) -> Path:
    """A broadcast join: MPEG-TS parts (sample rate, channels, seconds) concatenated byte for byte.

    The clock runs on across the joins (part p's audio starts at ``start_offset + sum(previous
    seconds)``); the video frames continue the :func:`frame_level` sequence and the 1/fps grid (a
    part has ``round(seconds * fps)`` frames). Each part's audio is silence with a
    ``burst_s`` burst of ``BURST_HZ`` (amplitude 0.5) starting ``burst_at`` s into the part (the first
    part's audio starts ``AUDIO_DELAY_S`` after its video, so the file's origin is its first frame).
    With the defaults a clip from 0 hears bursts at 0.5 s and 2.0 s.
    """
    path = Path(path)
    data = b""
    t_part = 0.0
    frames_before = 0
    for p, (rate, channels, seconds) in enumerate(parts):
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mpegts") as out:
            vstream = _video_stream(out, "libx264", fps, (64, 48), keyint=fps)
            layout = "stereo" if channels == 2 else "mono"
            astream = out.add_stream("aac", rate=rate, layout=layout)
            first = frames_before
            delay = AUDIO_DELAY_S if p == 0 else 0.0

            def burst(first_sample: int, count: int, rate: int = rate, delay: float = delay) -> np.ndarray:
                t = (first_sample + np.arange(count)) / rate + delay
                on = (t >= burst_at) & (t < burst_at + burst_s)
                return np.where(on, 0.5 * np.sin(2 * np.pi * BURST_HZ * (t - burst_at)), 0).astype(np.float32)

            _write_av(
                out, vstream, astream, seconds, fps,
                lambda i, first=first: np.full((48, 64, 3), frame_level(first + i), np.uint8),
                burst, offset=start_offset + t_part, audio_delay=delay, first_pts=round(start_offset * fps) + first,
            )  # fmt: skip
        data += buf.getvalue()
        t_part += seconds
        frames_before += round(seconds * fps)
    path.write_bytes(data)
    return path


def _jpeg(size: tuple[int, int] = (32, 32)) -> bytes:
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height = size
    ctx.pix_fmt = "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(marked_picture(size), format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


def make_cover_art_file(
    path: str | Path, seconds: float = 2.5, *, video: bool = False, cover_first: bool = False
) -> Path:
    """Audio (sine) with an attached cover picture; with ``video`` also a real H.264 track (25 fps).

    .m4a/.mp4: the cover in the ``covr`` atom (MJPEG); ``cover_first`` moves the metadata before the
    tracks, so FFmpeg lists the cover as stream 0. .mp3: an ID3v2 APIC picture (PNG; no ``video``).
    .mkv: a ``cover.jpg`` attachment. FFmpeg reports each cover as a video stream with the
    ``attached_pic`` disposition.
    """
    path = Path(path)
    rate = 44100
    if path.suffix == ".mkv":
        with av.open(str(path), mode="w", format="matroska") as out:
            out.add_attachment("cover.jpg", "image/jpeg", _jpeg())
            vstream = _video_stream(out, "libx264", 25, (64, 48), keyint=25) if video else None
            astream = out.add_stream("aac", rate=rate, layout="stereo")
            _write_av(out, vstream, astream, seconds, 25, lambda i: np.full((48, 64, 3), frame_level(i), np.uint8),
                      _sine_source(rate))  # fmt: skip
        return path
    mp3 = path.suffix == ".mp3"
    with av.open(str(path), mode="w", format="mp3" if mp3 else "mp4") as out:
        vstream = _video_stream(out, "libx264", 25, (64, 48), keyint=25) if video and not mp3 else None
        astream = out.add_stream("libmp3lame" if mp3 else "aac", rate=rate, layout="stereo")
        cover = out.add_stream("png" if mp3 else "mjpeg", rate=1)
        cover.width, cover.height = 32, 32
        cover.pix_fmt = "rgb24" if mp3 else "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(marked_picture((32, 32)), format="rgb24")
        picture = picture.reformat(format=cover.pix_fmt)
        picture.pts = 0
        for packet in [*cover.encode(picture), *cover.encode(None)]:
            out.mux(packet)
        source = _sine_source(rate, sample_format="s16p" if mp3 else "fltp")
        _write_av(out, vstream, astream, seconds, 25, lambda i: np.full((48, 64, 3), frame_level(i), np.uint8), source)
    if cover_first and not mp3:
        _move_metadata_first(path)
    return path


def make_still_picture_clip(path: str | Path, seconds: float = 2.5) -> Path:
    """A .mkv whose video stream is a real track (not an attached picture) holding one MJPEG frame; sine audio."""
    path = Path(path)
    with av.open(str(path), mode="w", format="matroska") as out:
        still = out.add_stream("mjpeg", rate=25)
        still.width, still.height = 64, 48
        still.pix_fmt = "yuvj420p"
        astream = out.add_stream("aac", rate=44100, layout="stereo")
        picture = av.VideoFrame.from_ndarray(marked_picture(), format="rgb24").reformat(format="yuvj420p")
        picture.pts = 0
        for packet in [*still.encode(picture), *still.encode(None)]:
            out.mux(packet)
        _write_av(out, None, astream, seconds, 25, None, _sine_source(44100))
    return path


# ---- writers shared by the helpers above


def _video_stream(out: av.container.OutputContainer, codec: str, fps: int, size: tuple[int, int], keyint: int | None):
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = keyint or 100_000
    if codec == "libx264":  # no scene-cut keyframes: grey levels jump every frame
        stream.options = {"preset": "ultrafast", "crf": "18", "x264-params": "scenecut=0"}
    elif codec in ("mpeg2video", "mpeg4"):
        stream.options = {"sc_threshold": "1000000000", "qscale": "2"}
    elif codec == "libvpx":
        stream.options = {"crf": "10", "b": "1M", "auto-alt-ref": "0"}
    return stream


def _sine_source(rate: int, sample_format: str = "fltp"):
    def source(first: int, count: int) -> np.ndarray:
        return sine(first, count, rate)

    source.sample_format = sample_format  # type: ignore[attr-defined]
    return source


def _write_av(
    out: av.container.OutputContainer,
    vstream: av.VideoStream | None,
    astream: av.AudioStream,
    seconds: float,
    fps: int,
    picture,
    audio_source,
    *,
    offset: float = 0.0,
    audio_delay: float | None = None,
    first_pts: int | None = None,
) -> None:
    """Interleave ``picture(i)`` frames at ``offset + i / fps`` and ``audio_source(first, count)`` samples
    from ``offset + audio_delay`` (default ``AUDIO_DELAY_S`` when ``offset`` is set, else 0)."""
    rate = astream.sample_rate
    channels = astream.layout.nb_channels
    fmt = getattr(audio_source, "sample_format", "fltp")
    if astream.codec_context.name == "pcm_s16le":
        fmt = "s16"
    delay = (AUDIO_DELAY_S if offset else 0.0) if audio_delay is None else audio_delay
    n_samples = round((seconds - delay) * rate)
    chunk = astream.codec_context.frame_size or 1024
    audio_t0 = round((offset + delay) * rate)
    next_sample = 0
    if vstream is not None:
        vstream.codec_context.time_base = Fraction(1, fps)
    frames = round(seconds * fps) if vstream is not None else 0

    def write_audio(upto: float) -> None:
        nonlocal next_sample
        while next_sample < n_samples and delay + next_sample / rate <= upto:
            count = min(chunk, n_samples - next_sample)
            wave = audio_source(next_sample, count)
            data = np.stack([wave] * channels)
            if fmt.startswith("s16"):
                data = (data * 32767).astype(np.int16)
                if fmt == "s16":
                    data = data.T.reshape(1, -1)
            layout = "stereo" if channels == 2 else "mono"
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
            frame.sample_rate = rate
            frame.pts = audio_t0 + next_sample
            frame.time_base = Fraction(1, rate)
            out.mux(astream.encode(frame))
            next_sample += count

    for i in range(frames):
        write_audio(i / fps)
        frame = av.VideoFrame.from_ndarray(picture(i), format="rgb24")
        frame.pts = (round(offset * fps) if first_pts is None else first_pts) + i
        frame.time_base = Fraction(1, fps)
        out.mux(vstream.encode(frame))
    write_audio(np.inf)
    for stream in (vstream, astream):
        if stream is not None:
            out.mux(stream.encode(None))


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of the ISO-BMFF boxes in data[start:end] (32-bit sizes only)."""
    found = []
    while start + 8 <= end:
        size = int.from_bytes(data[start : start + 4], "big")
        found.append((data[start + 4 : start + 8], start, size))
        start += size
    return found


def _move_metadata_first(path: Path) -> None:
    """Reorder the moov box's children to mvhd, udta, meta, then the tracks (sizes and offsets unchanged)."""
    data = path.read_bytes()
    moov = next(b for b in _boxes(data, 0, len(data)) if b[0] == b"moov")
    _, at, size = moov
    children = _boxes(data, at + 8, at + size)
    order = {b"mvhd": 0, b"udta": 1, b"meta": 2}
    children.sort(key=lambda b: order.get(b[0], 3))
    body = b"".join(data[o : o + s] for _, o, s in children)
    assert len(body) == size - 8, "moov children do not tile the box"
    path.write_bytes(data[: at + 8] + body + data[at + size :])
