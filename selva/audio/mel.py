"""Log-mel converter of MMAudio's 16 kHz (and 44.1 kHz) pipeline, with its own slaney filterbank.

The official converter (``mmaudio/ext/mel_converter.py``) builds its filterbank with librosa. We
compute the same filterbank here with NumPy, reproducing librosa's float64 formulas *and* its
float32 storage (librosa fills a float32 array row by row, then scales it in place), so the buffer
equals the official ``mel_basis`` bit for bit without a librosa dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# librosa's slaney mel scale: linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    freq = np.asanyarray(freq, dtype=np.float64)
    mels = freq / _F_SP
    log_region = freq >= _MIN_LOG_HZ
    # np.where evaluates both branches; the log of small frequencies is discarded, so silence it.
    with np.errstate(divide="ignore"):
        log_mels = _MIN_LOG_MEL + np.log(freq / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(log_region, log_mels, mels)


def mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asanyarray(mels, dtype=np.float64)
    freqs = _F_SP * mels
    log_region = mels >= _MIN_LOG_MEL
    return np.where(log_region, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels - _MIN_LOG_MEL)), freqs)


def slaney_mel_filterbank(
    sampling_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm='slaney'), float32.

    Each triangle is computed in float64 and stored into a float32 row; the slaney area
    normalisation then multiplies that float32 row by a float64 factor and rounds again. This
    double rounding is librosa's own behaviour (its default dtype is float32), and the official
    buffer carries it.
    """
    fmax = sampling_rate / 2.0 if fmax is None else float(fmax)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sampling_rate)
    mel_points = np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2)
    mel_f = mel_to_hz_slaney(mel_points)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]
    return weights


@dataclass(frozen=True)
class MelConfig:
    sampling_rate: int = 16_000
    n_fft: int = 1024
    num_mels: int = 80
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-5
    """The log is taken of max(mel, log_floor)."""
    natural_log: bool = False
    """The 16 kHz converter takes log10, the 44.1 kHz one the natural log (official code)."""


# Both verified against the official tables and vectors (../shared/reference, ../shared/reference-44k).
MEL_CONFIGS: dict[str, MelConfig] = {
    "16k": MelConfig(),
    "44k": MelConfig(sampling_rate=44_100, n_fft=2048, num_mels=128, hop_size=512, win_size=2048, fmax=22_050.0,
                     natural_log=True),
}


class MelConverter(nn.Module):
    """Waveform (B, samples) in [-1, 1] -> log-mel (B, num_mels, frames); log10 at 16 kHz, ln at 44.1 kHz.

    ``mel_basis`` and ``hann_window`` are float32 persistent buffers, as in the official module;
    ``.double()`` casts the same float32 values up, which is exactly what the float64 reference run
    did.
    """

    mel_basis: torch.Tensor
    hann_window: torch.Tensor

    def __init__(self, config: MelConfig | None = None) -> None:
        super().__init__()
        self.config = config or MelConfig()
        c = self.config
        basis = slaney_mel_filterbank(c.sampling_rate, c.n_fft, c.num_mels, c.fmin, c.fmax)
        self.register_buffer("mel_basis", torch.from_numpy(basis))
        self.register_buffer("hann_window", torch.hann_window(c.win_size, dtype=torch.float32))

    @property
    def hop_size(self) -> int:
        return self.config.hop_size

    def num_frames(self, num_samples: int) -> int:
        # Padding (n_fft - hop) in total, then frames of n_fft at stride hop (center=False).
        c = self.config
        return (num_samples + (c.n_fft - c.hop_size) - c.n_fft) // c.hop_size + 1

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        c = self.config
        waveform = waveform.clamp(min=-1.0, max=1.0)
        # Reflect-pad so that frames are centred on multiples of hop with center=False stft
        # (official quirk: the padding is (n_fft - hop) / 2, not n_fft / 2).
        pad = (c.n_fft - c.hop_size) // 2
        waveform = nn.functional.pad(waveform.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            waveform,
            c.n_fft,
            hop_length=c.hop_size,
            win_length=c.win_size,
            window=self.hann_window,
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        spec = torch.view_as_real(spec)
        # The 1e-9 keeps the sqrt differentiable at zero; it is part of the official numbers.
        magnitude = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
        mel = torch.matmul(self.mel_basis, magnitude)
        mel = torch.clamp(mel, min=c.log_floor)
        return torch.log(mel) if c.natural_log else torch.log10(mel)


def get_mel_converter(mode: str = "16k") -> MelConverter:
    if mode not in MEL_CONFIGS:
        raise ValueError(f"unknown mel mode {mode!r}; expected one of {sorted(MEL_CONFIGS)}")
    return MelConverter(MEL_CONFIGS[mode])
