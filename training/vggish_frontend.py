"""VGGish's log-mel front-end in numpy, as av-benchmark computes it before FD-VGG.

av-benchmark (``av_bench/vggish/mel_features.py`` and ``vggish.py``) uses the front-end of Google's
TensorFlow VGGish release (``mel_features.py``), not a torchaudio mel: the constants and the mel
matrix below follow that definition, written from its description (docs/evaluate.md):

* frames of 400 samples (25 ms at 16 kHz), hop 160 (10 ms), no padding;
* periodic Hann window, magnitude of a 512-point real FFT (257 bins);
* 64 mel bands, 125-7500 Hz, HTK mel scale ``1127 ln(1 + f/700)``, triangles built in the mel
  domain with the DC bin zeroed;
* ``log(mel + 0.01)``;
* non-overlapping examples of 96 frames (0.96 s); an incomplete last example is dropped.

8 s at 16 kHz gives 798 frames, hence 8 examples of (96, 64).
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
WINDOW = 400  # samples: round(16000 * 0.025)
HOP = 160  # samples: round(16000 * 0.010)
FFT = 512  # the next power of two above the window
MEL_BANDS = 64
MEL_LOW_HZ, MEL_HIGH_HZ = 125.0, 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s of 10 ms frames, also the hop between examples


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_matrix(bins: int = FFT // 2 + 1, rate: int = SAMPLE_RATE, bands: int = MEL_BANDS,
               low_hz: float = MEL_LOW_HZ, high_hz: float = MEL_HIGH_HZ) -> np.ndarray:
    """(bins, bands) weights: band i is a triangle over the spectrogram bins' mel positions, rising
    from edge i to edge i+1 and falling to edge i+2 of ``bands + 2`` mel-spaced edges; bin 0 (DC)
    gets no weight."""
    bin_mel = hertz_to_mel(np.linspace(0.0, rate / 2, bins))
    edges = np.linspace(hertz_to_mel(low_hz), hertz_to_mel(high_hz), bands + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel[:, None] - lower) / (center - lower)
    falling = (upper - bin_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


def frames(signal: np.ndarray, length: int, hop: int) -> np.ndarray:
    """(N, ...) -> (max(0, 1 + (N - length) // hop), length, ...): whole frames only."""
    count = max(0, 1 + (signal.shape[0] - length) // hop)
    if count == 0:
        return np.zeros((0, length) + signal.shape[1:], signal.dtype)
    index = np.arange(length)[None, :] + hop * np.arange(count)[:, None]
    return signal[index]


def log_mel(wave: np.ndarray) -> np.ndarray:
    """Mono 16 kHz waveform (T,) -> log-mel frames (F, 64), float64."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)  # periodic Hann
    spectrum = np.abs(np.fft.rfft(frames(np.asarray(wave, np.float64), WINDOW, HOP) * window, FFT))
    return np.log(spectrum @ mel_matrix() + LOG_OFFSET)


def examples(wave: np.ndarray) -> np.ndarray:
    """Mono 16 kHz waveform (T,) -> VGGish input examples (E, 96, 64) float32."""
    return frames(log_mel(wave), EXAMPLE_FRAMES, EXAMPLE_FRAMES).astype(np.float32)
