"""Opening and probing media files with PyAV: what a file holds, and which stream is its video.

``open_media`` turns every way a file can fail to open (missing, not a file, empty, not media) into
:class:`~preprocessing.errors.Rejected` with a typed reason; ``probe`` lists the container's streams
(:class:`MediaInfo`) without decoding, except the first video frame, which carries the display
matrix. The video stream rule lives here because the decoder (:mod:`preprocessing.media`) and the
probe must agree on it: the first video stream that is not an attached picture (cover art in
m4a/mp3, an image attachment in mkv), a default-flagged one first.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av

from preprocessing.errors import Rejected, RejectReason
from preprocessing.faults import FaultClass, classify
from preprocessing.orientation import Orientation, from_frame

# FFmpeg's HTTP reader, on a connection that drops mid-response: reconnect at the offset reached.
# Without it a dropped transfer reads as a truncated file (InvalidDataError), a data error we
# would record for good. A failure to connect at all still raises (ECONNRESET, ...): the caller retries.
HTTP_OPTIONS = {"reconnect": "1", "reconnect_max_retries": "5"}
# A server that accepts and never answers (or stalls mid-file) would block a worker forever: every
# URL read gets FFmpeg's rw_timeout, and a read that waits longer fails with ETIMEDOUT/EIO, a
# transient fault (retried, then the shard fails loudly). Seconds; generous for a slow object store.
IO_TIMEOUT_S = 30.0
MediaSource = str | os.PathLike[str] | BinaryIO


@dataclass(frozen=True)
class StreamInfo:
    """One stream of a container as its headers describe it (nothing decoded but the orientation)."""

    index: int
    kind: str  # "video", "audio", "attached_pic" (cover art: not video), "subtitle", "data", ...
    codec: str
    duration: float | None  # seconds, as the container states it
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    frames: int | None = None
    sample_rate: int | None = None
    channels: int | None = None
    orientation: Orientation | None = None  # video: from the first frame's display matrix (None: not read)


@dataclass(frozen=True)
class MediaInfo:
    """A probed file: container format, duration and size, and its streams in container order."""

    name: str
    format: str
    duration: float | None  # seconds
    size_bytes: int | None
    streams: tuple[StreamInfo, ...]
    video_index: int | None = None  # the stream decode_clip takes frames from (see video_stream)

    def first(self, kind: str) -> StreamInfo | None:
        return next((s for s in self.streams if s.kind == kind), None)

    @property
    def video(self) -> StreamInfo | None:
        """The stream decode_clip takes frames from; attached pictures (kind ``attached_pic``) never are."""
        if self.video_index is None:
            return None
        return next(s for s in self.streams if s.index == self.video_index)

    @property
    def audio(self) -> StreamInfo | None:
        return self.first("audio")

    def stream_summary(self) -> str:
        kinds = [s.kind for s in self.streams]
        return "streams: " + (", ".join(kinds) if kinds else "none")

    def with_orientation(self, index: int, orientation: Orientation) -> MediaInfo:
        streams = tuple(
            dataclasses.replace(s, orientation=orientation) if s.index == index else s for s in self.streams
        )
        return dataclasses.replace(self, streams=streams)


def is_attached_picture(stream: av.stream.Stream) -> bool:
    """Cover art and image attachments: FFmpeg lists them as one-picture video streams."""
    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def video_stream(container: av.container.InputContainer) -> av.VideoStream | None:
    """The video stream to decode: not an attached picture; a default-flagged one first."""
    candidates = [s for s in container.streams.video if not is_attached_picture(s)]
    default = [s for s in candidates if s.disposition & av.stream.Disposition.default]
    return (default or candidates or [None])[0]


def probe_container(container: av.container.InputContainer, name: str, size: int | None) -> MediaInfo:
    streams = []
    chosen = video_stream(container)
    for s in container.streams:
        ctx = s.codec_context
        kind = "attached_pic" if s.type == "video" and is_attached_picture(s) else s.type
        common = dict(index=s.index, kind=kind, codec=ctx.name if ctx is not None else "unknown")
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
    return MediaInfo(name, container.format.name, duration, size, tuple(streams), chosen.index if chosen else None)


def media_label(source: MediaSource, name: str | None) -> str:
    """How messages name ``source``: ``name`` if given, else its path, else the file object's name."""
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def ffmpeg_reason(err: BaseException) -> str:
    """The short reason FFmpeg gives for ``err`` (its strerror), for one-line rejection messages."""
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def open_media(
    source: MediaSource, name: str | None = None, io_timeout_s: float = IO_TIMEOUT_S
) -> tuple[av.container.InputContainer, int | None]:
    """Open ``source`` for reading, turning every way the file can be bad into :class:`Rejected`.

    Storage and network faults (``preprocessing.faults``: ECONNRESET, EIO, an HTTP 5xx, ...) are
    raised as they are: they say nothing about the file, and the caller may retry them; a URL read
    that waits more than ``io_timeout_s`` seconds is one. Returns the container and the file size in
    bytes (None for file objects and URLs).
    """
    label = media_label(source, name)
    size: int | None = None
    if isinstance(source, (str, os.PathLike)) and "://" not in os.fspath(source):  # URLs go to FFmpeg as they are
        path = Path(source)
        if not path.exists():
            raise Rejected(RejectReason.MISSING_FILE, f"{label}: no such file")
        if not path.is_file():
            raise Rejected(RejectReason.MISSING_FILE, f"{label}: not a regular file")
        size = path.stat().st_size
        if size == 0:
            raise Rejected(RejectReason.UNDECODABLE, f"{label}: file is empty (0 bytes)")
        source = os.fspath(path)
    options = None
    if isinstance(source, str) and "://" in source:
        options = {"rw_timeout": str(round(io_timeout_s * 1e6))}  # microseconds, as FFmpeg counts
        if source.startswith(("http://", "https://")):
            options.update(HTTP_OPTIONS)
    try:
        container = av.open(source, mode="r", metadata_errors="ignore", options=options)
    except (av.FFmpegError, OSError, ValueError) as err:  # InvalidDataError is a ValueError
        kind = classify(err)
        if kind is FaultClass.TRANSIENT:
            raise
        if kind is FaultClass.MISSING:  # a URL that is not there (404): checked like a local path
            raise Rejected(RejectReason.MISSING_FILE, f"{label}: not found: {ffmpeg_reason(err)}") from None
        raise Rejected(RejectReason.UNDECODABLE, f"{label}: cannot open as media: {ffmpeg_reason(err)}") from None
    return container, size


def _first_orientation(container: av.container.InputContainer, stream: av.VideoStream) -> Orientation | None:
    """The display orientation of the first decodable frame (None if none decodes in the first packets)."""
    try:
        for count, packet in enumerate(container.demux(stream)):
            for frame in packet.decode():
                return from_frame(frame)
            if count > 300:
                break
    except av.FFmpegError:
        pass
    return None


def probe(source: MediaSource, name: str | None = None, io_timeout_s: float = IO_TIMEOUT_S) -> MediaInfo:
    """Container and stream facts; raises :class:`Rejected` if it cannot open.

    The only decoding is of the first video frame: FFmpeg exposes the display matrix on decoded
    frames (PyAV has no stream side data), so that is where ``StreamInfo.orientation`` comes from.
    """
    label = media_label(source, name)
    container, size = open_media(source, label, io_timeout_s)
    with container:
        info = probe_container(container, label, size)
        stream = video_stream(container)
        if stream is not None:
            orientation = _first_orientation(container, stream)
            if orientation is not None:
                info = info.with_orientation(stream.index, orientation)
        return info
