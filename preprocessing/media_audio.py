"""Audio side of :func:`preprocessing.media.decode_clip`: resample to mono at the training rate, place by time.

Decoded audio arrives as runs of frames whose samples follow each other. A run is resampled as one
piece (one resampler, no seams inside it) and placed on the clip's time line by the timestamp of its
first sample. A new run starts when

* the sample format, channel layout or sample rate changes (broadcast recordings joined at a
  boundary: 48 kHz stereo, then 44.1 kHz mono): each part is resampled with its own resampler;
* a frame's timestamp is more than ``AUDIO_JUMP_S`` away from where the previous frame ended: a gap
  (stays zeros) or an overlap (a joined part whose encoder priming starts 21-23 ms before the join):
  the new run goes where its timestamps say.

Smaller differences (millisecond time bases round 23.2 ms AAC frames by up to 0.5 ms) are timestamp
rounding, not timing: within a run the samples are contiguous. Where runs overlap, the later one
wins (the joined part's priming covers the last ms of the part before).

Each run's first frame is trimmed to the next source sample that lies on the output sample grid
anchored at the container's start: after a seek the first decoded sample sits at an arbitrary
source sample, and resampling from there would shift every output sample by a fraction of a sample
against a decode from the top (a 0.1-sample shift is a ~0.03 error at 8 kHz). For 44.1 kHz that is
every 441 source samples (10 ms).
"""

from __future__ import annotations

import fractions
import math

import av
import numpy as np

from preprocessing.errors import Rejected, RejectReason

AUDIO_JUMP_S = 0.01  # a timestamp this far (s) from the previous frame's end starts a new run, placed by it
AUDIO_SHORTFALL_S = 0.1  # uncovered audio inside the clip up to this much is zero-padded; more is too_short

__all__ = ["AUDIO_JUMP_S", "AUDIO_SHORTFALL_S", "AudioCollector", "place_audio"]


class AudioCollector:
    """Collects decoded audio frames as runs of mono float32 samples at ``rate`` (see the module doc).

    ``runs`` holds (time of the first sample in seconds, list of sample chunks); ``origin`` (seconds)
    anchors the output sample grid.
    """

    def __init__(self, rate: int, origin: float, stream_start: float | None = None, frame_size: int = 0) -> None:
        self.rate = rate
        self.origin = origin
        self.stream_start = stream_start  # time of the audio stream's first sample, as the container says
        self.frame_size = frame_size  # the codec's fixed samples per frame (AAC 1024, MP2 1152), 0 if it varies
        self.runs: list[tuple[float, list[np.ndarray]]] = []
        self.resampler: av.AudioResampler | None = None
        self.setup: tuple[str, str, int] | None = None  # (format, layout, rate) of the current run
        self.next_time: float | None = None  # where the current run's next frame should start

    @property
    def first_time(self) -> float | None:
        """Time of the first collected sample (None before any)."""
        return self.runs[0][0] if self.runs else None

    def _source_index(self, frame: av.AudioFrame) -> int:
        """Index of the frame's first sample on the source-rate grid anchored at the origin.

        Millisecond time bases (Matroska, WebM, FLV) round a 1024-sample frame's time by up to half a
        millisecond, 24 samples at 48 kHz; a stream decoded from the top does not see that, its frames
        follow each other. So for a codec with a fixed frame size, when the stamp is coarser than a
        sample and lies within half a tick (+1 sample) of a whole number of frames from the stream's
        first sample, that exact position is taken instead. Otherwise (Opus, whose first frames are
        trimmed; fine time bases) the stamp is used as it is.
        """
        src_rate = frame.sample_rate
        exact = (frame.time - self.origin) * src_rate
        tick = float(frame.time_base) * src_rate if frame.time_base else 0.0
        if self.stream_start is not None and tick > 1 and frame.samples == self.frame_size > 0:
            from_first = (frame.time - self.stream_start) * src_rate
            whole = round(from_first / frame.samples) * frame.samples
            if abs(whole - from_first) <= tick / 2 + 1:
                return int(round((self.stream_start - self.origin) * src_rate)) + whole
        return int(round(exact))

    def _align(self, frame: av.AudioFrame) -> tuple[av.AudioFrame, float] | None:
        src_rate = frame.sample_rate
        index = self._source_index(frame)
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
        return frame, self.origin + (index + skip) / src_rate

    def _end_run(self) -> None:
        if self.resampler is not None:
            self._resample(None)
        self.resampler, self.setup = None, None

    def _resample(self, frame: av.AudioFrame | None) -> None:
        assert self.resampler is not None
        for out in self.resampler.resample(frame):
            self.runs[-1][1].append(out.to_ndarray().reshape(-1))

    def push(self, frame: av.AudioFrame | None) -> None:
        """Add a decoded frame; ``None`` ends the stream (flushes the resampler's delayed tail)."""
        if frame is None:
            self._end_run()
            return
        t = frame.time
        setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        jumped = t is not None and self.next_time is not None and abs(t - self.next_time) > AUDIO_JUMP_S
        if self.resampler is not None and (setup != self.setup or jumped):
            self._end_run()
        if self.resampler is None:
            if t is None:  # no timestamp: cannot be placed on the clip's time line
                return
            self.next_time = t + frame.samples / frame.sample_rate
            aligned = self._align(frame)
            if aligned is None:
                return
            frame, first = aligned
            self.resampler = av.AudioResampler(format="flt", layout="mono", rate=self.rate)
            self.setup = setup
            self.runs.append((first, []))
        else:
            start = t if t is not None else self.next_time
            self.next_time = start + frame.samples / frame.sample_rate
        self._resample(frame)


def place_audio(
    audio: AudioCollector, label: str, t0: float, start: float, duration: float, total: int
) -> tuple[np.ndarray, int]:
    """The waveform of ``total`` samples for [t0, t0 + duration) (t0 on the container's clock).

    Returns it with the number of samples inside the range that no run covered (zeros). More than
    ``AUDIO_SHORTFALL_S`` of those is :class:`Rejected` ``too_short``.
    """
    rate = audio.rate
    want = int(round(duration * rate))
    waveform = np.zeros(total, dtype=np.float32)
    covered = np.zeros(want, dtype=bool)
    for first, chunks in audio.runs:
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        at = int(round((first - t0) * rate))  # output index of the run's first sample
        lo, hi = max(at, 0), min(at + len(samples), want)
        if hi > lo:
            waveform[lo:hi] = samples[lo - at : hi - at]
            covered[lo:hi] = True
    shortfall = want - int(covered.sum())
    if shortfall > AUDIO_SHORTFALL_S * rate:
        raise Rejected(
            RejectReason.TOO_SHORT,
            f"{label}: audio has {(want - shortfall) / rate:.2f} s from {start:.2f} s, {duration:g} s needed",
        )
    return waveform, shortfall
