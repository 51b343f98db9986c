"""The frozen encoders of a preset, by family: audio codec + T5-slot and CLIP-slot text encoders.

- ``embedded``: no downloads. Codec = normalised log-mel with ``latent_dim`` bands + Griffin-Lim;
  text = the packaged MiniLM with fixed projections. Works with every preset.
- ``official``: MMAudio's mel + VAE + BigVGAN and FLAN-T5 / CLIP-H, from ``--weights DIR``
  (:mod:`selva.weights`). Every file is checked before anything heavy loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from selva.audio.bigvgan import BIGVGAN_CONFIGS, load_bigvgan
from selva.audio.codec import AudioCodec, EmbeddedCodec, OfficialCodec
from selva.audio.embedded_codec import EmbeddedCodecConfig
from selva.audio.mel import get_mel_converter
from selva.audio.vae import load_vae
from selva.presets import OFFICIAL_LATENT_DIMS, ModelPreset
from selva.text import ENCODER_KINDS, TextEncoder, build_text_encoders
from selva.weights import require

ENCODER_FAMILIES = ENCODER_KINDS  # one list: codecs and text encoders come in the same families


@dataclass
class FrozenEncoders:
    kind: str
    codec: AudioCodec
    t5: TextEncoder
    clip: TextEncoder


def _check_kind(kind: str) -> None:
    if kind not in ENCODER_FAMILIES:
        raise ValueError(f"unknown encoder family {kind!r}; choose one of {', '.join(ENCODER_FAMILIES)}")


def _check_official_preset(preset: ModelPreset) -> None:
    latent_dim, official = preset.generator.latent_dim, OFFICIAL_LATENT_DIMS[preset.audio_mode]
    if latent_dim != official:
        raise ValueError(
            f"preset {preset.name} has {latent_dim}-channel latents, but the official {preset.audio_mode} VAE makes "
            f"{official}; use --encoders embedded with it, or a released preset (selva presets)"
        )
    if not preset.released:  # the tiny presets' text widths (64) are not FLAN-T5's (768) or CLIP-H's (1024)
        raise ValueError(
            f"preset {preset.name} is not a released size: its text widths ({preset.generator.text_dim}) do not fit "
            f"the official text encoders; use --encoders embedded with it, or small_16k / small_44k / medium_44k / "
            f"large_44k"
        )


def embedded_codec_config(preset: ModelPreset) -> EmbeddedCodecConfig:
    """The embedded codec at the preset's audio rates: one latent per two mel hops (as the official VAE),
    an FFT of two latent hops, mel bands up to Nyquist, ``latent_dim`` of them."""
    seq = preset.seq
    hop = seq.spectrogram_frame_rate * seq.latent_downsample_rate
    return EmbeddedCodecConfig(sampling_rate=seq.sampling_rate, num_mels=preset.generator.latent_dim, n_fft=2 * hop,
                               hop_size=hop, fmax=seq.sampling_rate / 2)


def build_codec(
    kind: str, preset: ModelPreset, weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
    *, decoder: bool = True,
) -> AudioCodec:
    """The preset's codec; ``decoder=False`` skips the official vocoder (encode-only, e.g. precompute)."""
    _check_kind(kind)
    if kind == "embedded":
        return EmbeddedCodec(embedded_codec_config(preset)).to(device)
    _check_official_preset(preset)
    mode = preset.audio_mode
    paths = require(weights_dir, ["vae", "vocoder"] if decoder else ["vae"], preset.name)
    vae = load_vae(paths["vae"], mode, device=device)
    vocoder = load_bigvgan(paths["vocoder"], BIGVGAN_CONFIGS[mode], device=device) if decoder else None
    return OfficialCodec(get_mel_converter(mode).to(device), vae, vocoder)


def build_encoders(
    kind: str, preset: ModelPreset, weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
    *, decoder: bool = True,
) -> FrozenEncoders:
    """All frozen encoders of ``kind``; official files are all checked before the first one loads.
    ``decoder=False``: the codec only encodes (no vocoder file needed)."""
    _check_kind(kind)
    if kind == "official":
        _check_official_preset(preset)
        require(weights_dir, ["vae", "vocoder", "flan_t5", "clip"] if decoder else ["vae", "flan_t5", "clip"],
                preset.name)
    codec = build_codec(kind, preset, weights_dir, device, decoder=decoder)
    t5, clip = build_text_encoders(kind, preset, weights_dir, device=device)
    return FrozenEncoders(kind, codec, t5, clip)


# What a dataset records about its encoders (dataset.json "encoders") and an export repeats (export.json):
# the names say the family, the widths must fit the preset (training/train_data.py checks them)
_ENCODER_NAMES = {
    "embedded": {"t5": "minilm-l6-v2+fixed-projection", "clip_text": "minilm-l6-v2+fixed-projection",
                 "codec": "log-mel"},
    "official": {"t5": "flan-t5-base", "clip_text": "DFN5B-CLIP-ViT-H-14-384", "codec": "mmaudio-vae-16k"},
}
_OFFICIAL_CODECS = {"16k": "mmaudio-vae-16k", "44k": "mmaudio-vae-44k"}


def describe_encoders(kind: str, preset: ModelPreset) -> dict[str, dict]:
    """The ``encoders`` record of a dataset made with family ``kind`` for ``preset``."""
    _check_kind(kind)
    names = dict(_ENCODER_NAMES[kind])
    if kind == "official":
        names["codec"] = _OFFICIAL_CODECS[preset.audio_mode]
    return {
        "t5": {"name": names["t5"], "dim": preset.textsynch.text_dim},
        "clip_text": {"name": names["clip_text"], "dim": preset.generator.text_dim},
        # the rate says which audio the latents stand for: a 16 kHz dataset cannot train a 44.1 kHz model
        "codec": {"name": names["codec"], "latent_dim": preset.generator.latent_dim,
                  "sampling_rate": preset.sampling_rate},
    }


def encoder_family(description: dict) -> str:
    """The family (``embedded``/``official``) of an ``encoders`` record; ValueError for one we did not write."""
    names = {role: (description.get(role) or {}).get("name") for role in ("t5", "clip_text", "codec")}
    for kind, known in _ENCODER_NAMES.items():
        codecs = _OFFICIAL_CODECS.values() if kind == "official" else (known["codec"],)
        if names["t5"] == known["t5"] and names["clip_text"] == known["clip_text"] and names["codec"] in codecs:
            return kind
    raise ValueError(f"encoders {names} are neither the embedded nor the official family")
