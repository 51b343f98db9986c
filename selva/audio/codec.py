"""One interface for audio codecs: waveform <-> generator latent.

- ``OfficialCodec``: MMAudio's 16 kHz log-mel -> VAE (mean/std, 20 channels) and VAE decoder ->
  BigVGAN, loaded from official weight files.
- ``EmbeddedCodec``: normalised log-mel latent and Griffin-Lim; no weights.

Both take (B, S) waveforms in [-1, 1] at ``sampling_rate`` with S a multiple of
``samples_per_latent`` (``SequenceConfig.num_audio_frames`` is) and use channel-last latents
(B, N, latent_dim), the layout the generator and the shard format use.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from selva.audio.bigvgan import BigVGANVocoder
from selva.audio.embedded_codec import EmbeddedCodec
from selva.audio.mel import MelConverter
from selva.audio.vae import VAE


@runtime_checkable
class AudioCodec(Protocol):
    @property
    def sampling_rate(self) -> int: ...

    @property
    def latent_dim(self) -> int: ...

    @property
    def samples_per_latent(self) -> int: ...

    def encode(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) -> (mean, std), each (B, S / samples_per_latent, latent_dim)."""
        ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, N, latent_dim) -> (B, N * samples_per_latent)."""
        ...


class OfficialCodec(nn.Module):
    """MMAudio's 16 kHz codec: the latent is a sample of the VAE posterior over the log-mel."""

    def __init__(self, mel: MelConverter, vae: VAE, vocoder: BigVGANVocoder | None):
        """``vocoder`` None: an encode-only codec (precompute), whose ``decode`` raises."""
        super().__init__()
        self.mel, self.vae, self.vocoder = mel, vae, vocoder
        self.requires_grad_(False).eval()

    @property
    def sampling_rate(self) -> int:
        return self.mel.config.sampling_rate

    @property
    def latent_dim(self) -> int:
        return self.vae.embed_dim

    @property
    def samples_per_latent(self) -> int:
        return self.mel.hop_size * 2  # the VAE halves the mel frame rate

    def encode(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if wave.shape[-1] % self.samples_per_latent:
            raise ValueError(f"waveform length {wave.shape[-1]} is not a multiple of {self.samples_per_latent}")
        dist = self.vae.encode(self.mel(wave))
        return dist.mean.transpose(1, 2), dist.std.transpose(1, 2)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.vocoder is None:
            raise RuntimeError("this codec was built to encode only (no vocoder); build it with decoder=True")
        mel = self.vae.decode(latent.transpose(1, 2))
        return self.vocoder(mel).squeeze(1)


__all__ = ["AudioCodec", "EmbeddedCodec", "OfficialCodec"]
