"""training/vggish_frontend.py: the TF VGGish log-mel front-end av-benchmark uses before FD-VGG."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import get_window

from training.vggish_frontend import LOG_OFFSET, examples, hertz_to_mel, log_mel, mel_matrix


def test_eight_seconds_make_798_frames_and_8_examples():
    wave = np.random.RandomState(0).randn(128_000) * 0.1
    assert log_mel(wave).shape == (798, 64)  # 1 + (128000 - 400) // 160
    assert examples(wave).shape == (8, 96, 64) and examples(wave).dtype == np.float32
    np.testing.assert_array_equal(examples(wave)[3], log_mel(wave)[3 * 96:4 * 96].astype(np.float32))
    assert examples(wave[:15_000]).shape == (0, 96, 64)  # 0.94 s: no whole example, nothing padded
    assert examples(wave[:100]).shape == (0, 96, 64)  # shorter than one window


def test_mel_matrix_is_htk_triangles_between_125_and_7500_hz():
    weights = mel_matrix()
    assert weights.shape == (257, 64) and np.all(weights[0] == 0) and weights.max() <= 1.0
    hz = np.linspace(0, 8000, 257)
    edges = np.linspace(hertz_to_mel(125.0), hertz_to_mel(7500.0), 66)
    inside = (hertz_to_mel(hz) >= edges[1]) & (hertz_to_mel(hz) <= edges[-2])
    # evenly spaced triangles in mel: between the first and last centre, the two bands over a bin sum to 1
    np.testing.assert_allclose(weights[inside].sum(axis=1), 1.0, atol=1e-12)
    assert np.all((weights > 0).sum(axis=1) <= 2)
    assert np.all(weights[hz < 125.0] == 0) and np.all(weights[hz > 7500.0] == 0)
    assert hertz_to_mel(700.0) == pytest.approx(1127.0 * np.log(2.0))


def test_log_mel_is_the_periodic_hann_magnitude_spectrum_projected_and_logged():
    rng = np.random.RandomState(1)
    wave = rng.randn(2_000)
    frame = wave[160:560] * get_window("hann", 400)  # scipy's default "hann" is the periodic window
    expected = np.log(np.abs(np.fft.rfft(frame, 512)) @ mel_matrix() + LOG_OFFSET)
    np.testing.assert_allclose(log_mel(wave)[1], expected, rtol=1e-12)
    assert np.all(log_mel(np.zeros(1_000)) == np.log(LOG_OFFSET))


def test_a_tone_lights_the_band_around_its_frequency():
    t = np.arange(16_000) / 16_000
    centres_hz = 700.0 * (np.exp(np.linspace(hertz_to_mel(125.0), hertz_to_mel(7500.0), 66)[1:-1] / 1127.0) - 1)
    for band in (5, 30, 60):
        spectrum = log_mel(np.sin(2 * np.pi * centres_hz[band] * t)).mean(axis=0)
        assert abs(int(np.argmax(spectrum)) - band) <= 1
