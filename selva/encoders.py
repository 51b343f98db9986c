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

from selva.audio.bigvgan import load_bigvgan
from selva.audio.codec import AudioCodec, EmbeddedCodec, OfficialCodec
from selva.audio.embedded_codec import EmbeddedCodecConfig
from selva.audio.mel import get_mel_converter
from selva.audio.vae import load_vae
from selva.presets import ModelPreset
from selva.text import ENCODER_KINDS, TextEncoder, build_text_encoders
from selva.weights import require

ENCODER_FAMILIES = ENCODER_KINDS  # one list: codecs and text encoders come in the same families
OFFICIAL_LATENT_DIM = 20


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
    latent_dim = preset.generator.latent_dim
    if latent_dim != OFFICIAL_LATENT_DIM:
        raise ValueError(
            f"preset {preset.name} has {latent_dim}-channel latents, but the official VAE makes "
            f"{OFFICIAL_LATENT_DIM}; use --encoders embedded with it, or the small_16k preset"
        )


def build_codec(
    kind: str, preset: ModelPreset, weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
    *, decoder: bool = True,
) -> AudioCodec:
    """The preset's codec; ``decoder=False`` skips the official vocoder (encode-only, e.g. precompute)."""
    _check_kind(kind)
    latent_dim = preset.generator.latent_dim
    if kind == "embedded":
        return EmbeddedCodec(EmbeddedCodecConfig(num_mels=latent_dim)).to(device)
    _check_official_preset(preset)
    paths = require(weights_dir, ["vae", "vocoder"] if decoder else ["vae"])
    vae = load_vae(paths["vae"], device=device)
    vocoder = load_bigvgan(paths["vocoder"], device=device) if decoder else None
    return OfficialCodec(get_mel_converter("16k").to(device), vae, vocoder)


def build_encoders(
    kind: str, preset: ModelPreset, weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
    *, decoder: bool = True,
) -> FrozenEncoders:
    """All frozen encoders of ``kind``; official files are all checked before the first one loads.
    ``decoder=False``: the codec only encodes (no vocoder file needed)."""
    _check_kind(kind)
    if kind == "official":
        _check_official_preset(preset)
        require(weights_dir, ["vae", "vocoder", "flan_t5", "clip"] if decoder else ["vae", "flan_t5", "clip"])
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


def describe_encoders(kind: str, preset: ModelPreset) -> dict[str, dict]:
    """The ``encoders`` record of a dataset made with family ``kind`` for ``preset``."""
    _check_kind(kind)
    names = _ENCODER_NAMES[kind]
    return {
        "t5": {"name": names["t5"], "dim": preset.textsynch.text_dim},
        "clip_text": {"name": names["clip_text"], "dim": preset.generator.text_dim},
        "codec": {"name": names["codec"], "latent_dim": preset.generator.latent_dim},
    }


def encoder_family(description: dict) -> str:
    """The family (``embedded``/``official``) of an ``encoders`` record; ValueError for one we did not write."""
    names = {role: (description.get(role) or {}).get("name") for role in ("t5", "clip_text", "codec")}
    for kind, known in _ENCODER_NAMES.items():
        if names == known:
            return kind
    raise ValueError(f"encoders {names} are neither the embedded nor the official family")
