"""Video side of :func:`preprocessing.media.decode_clip`: pick, squash and orient the output frames.

Output frame k shows the last source frame whose pts <= t0 + k/fps (+ ``PTS_TOLERANCE_S``); up to
``MAX_PADDED_FRAMES`` outputs that no source frame covers repeat the nearest real frame. Each kept
source frame is squashed to S x S once, then given its display orientation
(:mod:`preprocessing.orientation`).
"""

from __future__ import annotations

import av
import numpy as np

from preprocessing.errors import Rejected, RejectReason
from preprocessing.orientation import Orientation, from_frame

MAX_PADDED_FRAMES = 3
PTS_TOLERANCE_S = 1e-3
# swscale's bicubic is FFmpeg's ``scale`` default; at these downscale ratios it filters over the whole
# source footprint, so no aliasing (unlike a plain bicubic kernel).
INTERPOLATION = "BICUBIC"

__all__ = ["INTERPOLATION", "MAX_PADDED_FRAMES", "PTS_TOLERANCE_S", "FramePicker", "check_video"]


class FramePicker:
    """Fills n output frames at times t0 + k/fps from source frames arriving in presentation order.

    With ``need_key`` (after a seek) frames are dropped until a keyframe: a decoder that starts
    mid-GOP either drops them itself (H.264) or builds them on a grey picture (MPEG-2). A frame counts
    as such if it is a keyframe or is not earlier than the first keyframe *packet* fed to the decoder
    (``key_time``): behind an mp4 edit list the keyframe itself is decoded but hidden, and the frames
    after it are sound.
    """

    def __init__(self, t0: float, n: int, fps: int, size: int, threads: int = 0, need_key: bool = False) -> None:
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
        self.need_key = need_key
        self.key_time: float | None = None  # time of the first keyframe packet fed to the decoder after the seek
        self.first_time: float | None = None  # time of the first accepted source frame
        self.frames_seen = 0  # accepted source frames
        self.orientation: Orientation | None = None  # of the first frame written out
        self.stream_error: str | None = None  # a decode error that ended the stream early (damaged tail)

    @property
    def done(self) -> bool:
        return self.k >= len(self.targets)

    def _emit(self) -> None:
        assert self.prev is not None
        if self.prev_written >= 0:
            self.out[self.k] = self.out[self.prev_written]
        else:
            # squash, then orient: for a square output that equals orienting the full frame first
            rgb = self.reformatter.reformat(
                self.prev, self.size, self.size, "rgb24", interpolation=INTERPOLATION, threads=self.threads
            )
            orientation = from_frame(self.prev)
            if self.orientation is None:
                self.orientation = orientation
            self.out[self.k] = orientation.apply(rgb.to_ndarray())
            self.prev_written = self.k
        self.k += 1

    def push(self, frame: av.VideoFrame) -> None:
        t = frame.time
        if t is None or t <= self.prev_time:  # no timestamp or out of order: cannot be placed
            return
        if self.need_key:
            after_key = self.key_time is not None and t >= self.key_time - PTS_TOLERANCE_S
            if not (frame.key_frame or after_key):
                return
            self.need_key = False
        if self.first_time is None:
            self.first_time = t
        self.frames_seen += 1
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


def check_video(picker: FramePicker, label: str, start: float, duration: float, file_duration: float | None) -> int:
    n = len(picker.targets)
    missing = n - picker.covered
    if missing > MAX_PADDED_FRAMES or picker.covered == 0:
        ends = f" (the file lasts {file_duration:.2f} s)" if file_duration else ""
        if picker.frames_seen == 1:
            ends += "; the video stream holds a single still picture"
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
