"""MMAudio's 16 kHz audio components in pure PyTorch: log-mel converter, mel VAE, BigVGAN vocoder.

All three load the official state-dict names strictly (see ``../shared/reference``) and reproduce
the official reference vectors.
"""

from selva.audio.bigvgan import BigVGANConfig, BigVGANVocoder, canonical_state_dict, load_bigvgan
from selva.audio.mel import MelConfig, MelConverter, get_mel_converter, slaney_mel_filterbank
from selva.audio.vae import VAE, VAEConfig, get_my_vae, load_vae

__all__ = [
    "VAE",
    "BigVGANConfig",
    "BigVGANVocoder",
    "MelConfig",
    "MelConverter",
    "VAEConfig",
    "canonical_state_dict",
    "get_mel_converter",
    "get_my_vae",
    "load_bigvgan",
    "load_vae",
    "slaney_mel_filterbank",
]
