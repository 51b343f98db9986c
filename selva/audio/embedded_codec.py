"""The embedded audio codec: normalised log-mel as the latent, Griffin-Lim as the vocoder.

It needs no weights, so the ``tiny`` preset, the tests and the demo run end to end on a laptop
and still produce sound. The latent runs at the same rate as the official VAE latent (one frame per
512 samples at 16 kHz, so ``SequenceConfig`` lengths hold unchanged); its width is ``num_mels``.
The encoding is deterministic, so its ``std`` is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selva.audio.mel import slaney_mel_filterbank


@dataclass(frozen=True)
class EmbeddedCodecConfig:
    sampling_rate: int = 16_000
    num_mels: int = 40
    n_fft: int = 1024
    hop_size: int = 512  # = official mel hop 256 x VAE downsampling 2
    fmax: float = 8000.0
    log_floor: float = 1e-5
    # log10-mel values of speech/effects at 16 kHz lie roughly in [-5, 1]: map them near [-1, 1]
    log_center: float = -2.0
    log_scale: float = 2.0
    griffin_lim_iters: int = 32
    griffin_lim_momentum: float = 0.99


class EmbeddedCodec(nn.Module):
    """Waveform (B, S) <-> latent (B, S / hop, num_mels)."""

    mel_basis: torch.Tensor
    window: torch.Tensor

    def __init__(self, config: EmbeddedCodecConfig | None = None):
        super().__init__()
        self.config = c = config or EmbeddedCodecConfig()
        basis = torch.from_numpy(slaney_mel_filterbank(c.sampling_rate, c.n_fft, c.num_mels, 0.0, c.fmax))
        self.register_buffer("mel_basis", basis, persistent=False)
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        # non-negative least-squares-ish inverse of the filterbank, used to seed Griffin-Lim
        self.register_buffer("mel_inverse", torch.linalg.pinv(basis.double()).float(), persistent=False)

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def latent_dim(self) -> int:
        return self.config.num_mels

    @property
    def samples_per_latent(self) -> int:
        return self.config.hop_size

    def _stft(self, wave: torch.Tensor) -> torch.Tensor:
        # centred frames: S / hop + 1 of them; frame k is centred on sample k * hop
        c = self.config
        return torch.stft(wave, c.n_fft, c.hop_size, window=self.window, center=True, return_complex=True)

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        c = self.config
        return torch.istft(spec, c.n_fft, c.hop_size, window=self.window, center=True, length=length)

    def encode(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) in [-1, 1] -> (mean, std), each (B, S // hop, num_mels)."""
        c = self.config
        if wave.shape[-1] % c.hop_size:
            raise ValueError(f"waveform length {wave.shape[-1]} is not a multiple of the hop {c.hop_size}")
        mag = self._stft(wave.clamp(-1, 1).float()).abs()
        mel = torch.log10(torch.clamp(self.mel_basis @ mag, min=c.log_floor))
        latent = ((mel - c.log_center) / c.log_scale).transpose(1, 2)
        latent = latent[:, : wave.shape[-1] // c.hop_size]  # drop the frame centred past the end
        return latent, torch.zeros_like(latent)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, N, num_mels) -> waveform (B, N * hop) by Griffin-Lim with momentum."""
        c = self.config
        latent = latent.float()
        mel = 10 ** (latent.transpose(1, 2) * c.log_scale + c.log_center)
        mag = torch.clamp(self.mel_inverse @ mel, min=0.0)
        length = latent.shape[1] * c.hop_size
        # restore the frame centred past the end that encode dropped
        mag = F.pad(mag, (0, 1), mode="replicate")
        gen = torch.Generator(device="cpu").manual_seed(0)  # fixed phase seed: decoding is deterministic
        # one phase draw shared by the batch: a clip decodes to the same wave alone or at any batch position
        phase = torch.rand(mag.shape[1:], generator=gen).to(mag.device).expand_as(mag) * 2 * torch.pi
        spec = mag * torch.exp(1j * phase)
        previous = torch.zeros_like(spec)
        for _ in range(c.griffin_lim_iters):
            rebuilt = self._stft(self._istft(spec, length))[..., : mag.shape[-1]]
            accelerated = rebuilt - (c.griffin_lim_momentum / (1 + c.griffin_lim_momentum)) * previous
            previous = rebuilt
            spec = mag * accelerated / accelerated.abs().clamp(min=1e-8)
        return self._istft(spec, length).clamp(-1, 1)
