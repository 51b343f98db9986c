"""Sound onsets in a waveform, and how well they follow a list of event times (the synthetic proof).

The synthetic world's sounds are tone bursts that start on a flash of their object and decay in
about 0.2 s (``pipelines.train_world``). Its scores (issue 13, ``docs/benchmarks.md``) ask *when* a
generated track has sound onsets, and *which* tone it holds:

* **onsets** (:func:`detect_onsets`): the broadband level of 10 ms frames in dB; an onset is a frame
  where the level has risen by at least ``rise_db`` over the previous ``lag`` frames, a local maximum
  of that rise within ``min_gap_s``, loud enough both absolutely (``floor_dbfs``: silence has none)
  and relative to the track's loudest frame (``below_peak_db``: the faint tail of a spurious sound
  does not count next to a real burst), and new (``memory_s``: louder by ``rise_db`` than all of the
  recent past, so a ripple inside a decaying burst is not a second sound). A level rise rather than
  spectral flux because a burst is one tone: its energy sits in two or three STFT bins, and a mean
  over bins would drown it.
* **onset F1** (:func:`onset_f1`): detections matched one-to-one to events within ``tolerance_s``
  (±80 ms: two video frames, the tolerance of the issue), nearest first, as ``mir_eval.onset`` does;
  F1 = 2PR / (P + R). No event and no detection is F1 1; either one without the other is 0.
* **dominant pitch** (:func:`dominant_kind`): which of the kinds' pitches holds the most energy in
  its band (± a quarter of an octave), summed over the track.

Times are in seconds from the start of the track.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OnsetConfig:
    hop_s: float = 0.010  # frame hop (10 ms: an eighth of the tolerance)
    window_s: float = 0.032  # frame length (512 samples at 16 kHz)
    lag: int = 2  # the rise is measured over this many frames (20 ms: a 2 ms attack is one frame)
    rise_db: float = 9.0  # an onset raises the level by at least this much
    min_gap_s: float = 0.1  # two onsets are at least this far apart (the world's are >= 0.4 s apart)
    floor_dbfs: float = -50.0  # an onset frame is at least this loud (dB of full scale; silence has none)
    below_peak_db: float = 30.0  # ... and at most this far below the track's loudest frame
    # ... and a new sound: at least rise_db louder than every frame of the memory_s before its rise. A
    # decaying burst decoded by Griffin-Lim ripples (dips of ~20 dB and back within its tail, 0.1-0.2 s
    # after its onset); without this rule the ground truth's own codec round trip had 69 onsets for 49
    # events (docs/synth.md, "Scores")
    memory_s: float = 0.2


def frame_levels(audio: np.ndarray, rate: int, cfg: OnsetConfig = OnsetConfig()) -> np.ndarray:
    """(F,) level in dBFS of the Hann-windowed frames of ``audio`` ((N,) float in [-1, 1]); frame f
    starts at f * hop. A sine of amplitude 1 reads about -3 dBFS (its mean square is 1/2)."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1:
        raise ValueError(f"expected a mono waveform (N,), got shape {audio.shape}")
    hop, win = round(cfg.hop_s * rate), round(cfg.window_s * rate)
    count = max(0, (len(audio) - win) // hop + 1)
    if count == 0:
        return np.zeros(0)
    window = np.hanning(win)
    frames = np.lib.stride_tricks.sliding_window_view(audio, win)[::hop][:count] * window
    mean_square = (frames**2).sum(axis=1) / (window**2).sum()
    return 10.0 * np.log10(mean_square + 1e-12)


def detect_onsets(audio: np.ndarray, rate: int, cfg: OnsetConfig = OnsetConfig()) -> np.ndarray:
    """Onset times (s, ascending) of ``audio`` ((N,) float at ``rate`` Hz); the rules are the module's.
    The time of an onset is the centre of the frame where the rise peaks: that frame's window has
    just taken in the burst's attack, so its centre falls within a few ms of the true onset."""
    level = frame_levels(audio, rate, cfg)
    if len(level) <= cfg.lag:
        return np.zeros(0)
    rise = np.zeros_like(level)
    rise[cfg.lag :] = level[cfg.lag :] - level[: -cfg.lag]
    # the level of the loudest frame near the rise: the burst's peak, not its first frame
    loud = np.maximum.reduce([np.roll(level, -k) for k in range(cfg.lag + 1)])
    loud[len(level) - cfg.lag :] = level[len(level) - cfg.lag :]
    # the loudest frame of the memory_s that end where the rise starts (frame f - lag)
    memory = max(1, round(cfg.memory_s / cfg.hop_s))
    padded = np.concatenate([np.full(memory, -np.inf), level])
    before = np.max(np.lib.stride_tricks.sliding_window_view(padded, memory + 1), axis=1)[: len(level)]
    prior = np.full_like(level, -np.inf)
    prior[cfg.lag :] = before[: len(level) - cfg.lag]
    ok = (rise >= cfg.rise_db) & (loud >= cfg.floor_dbfs) & (loud >= level.max() - cfg.below_peak_db)
    ok &= loud - prior >= cfg.rise_db
    gap = max(1, round(cfg.min_gap_s / cfg.hop_s))
    picked: list[int] = []
    for f in np.flatnonzero(ok)[np.argsort(-rise[ok], kind="stable")]:  # strongest rise first
        if all(abs(f - p) >= gap for p in picked):
            picked.append(int(f))
    return np.sort(np.asarray(picked, dtype=np.float64)) * cfg.hop_s + cfg.window_s / 2


@dataclass(frozen=True)
class OnsetMatch:
    matched: int
    detected: int
    events: int

    @property
    def precision(self) -> float:
        return self.matched / self.detected if self.detected else float(self.events == 0)

    @property
    def recall(self) -> float:
        return self.matched / self.events if self.events else float(self.detected == 0)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0


def match_onsets(detected: Sequence[float], events: Sequence[float], tolerance_s: float = 0.08) -> OnsetMatch:
    """Match detections to events one-to-one within ``tolerance_s`` (the closest pairs first)."""
    detected, events = np.asarray(detected, np.float64), np.asarray(events, np.float64)
    pairs = sorted((abs(d - e), i, j) for i, d in enumerate(detected) for j, e in enumerate(events)
                   if abs(d - e) <= tolerance_s)  # fmt: skip
    used_d, used_e = set(), set()
    for _, i, j in pairs:
        if i not in used_d and j not in used_e:
            used_d.add(i)
            used_e.add(j)
    return OnsetMatch(len(used_d), len(detected), len(events))


def onset_f1(audio: np.ndarray, rate: int, events: Sequence[float], tolerance_s: float = 0.08,
             cfg: OnsetConfig = OnsetConfig()) -> float:
    """F1 of ``audio``'s detected onsets against ``events`` (s): the sync score of one track."""
    return match_onsets(detect_onsets(audio, rate, cfg), events, tolerance_s).f1


def band_energy(audio: np.ndarray, rate: int, pitch_hz: float, width_octaves: float = 0.25) -> float:
    """Energy of ``audio`` within ±``width_octaves`` of ``pitch_hz`` (sum of |FFT|², any unit)."""
    spectrum = np.abs(np.fft.rfft(np.asarray(audio, np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1.0 / rate)
    lo, hi = pitch_hz * 2.0**-width_octaves, pitch_hz * 2.0**width_octaves
    return float(spectrum[(freqs >= lo) & (freqs <= hi)].sum())


def dominant_kind(audio: np.ndarray, rate: int, pitches_hz: Sequence[float]) -> int:
    """Index of the pitch whose band holds the most energy in ``audio``."""
    return int(np.argmax([band_energy(audio, rate, p) for p in pitches_hz]))
