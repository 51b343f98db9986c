"""Generating audio for samples read back from shards: the stages ``selva demo`` strings together.

A shard sample already holds everything generation needs except the model: the sync frames, the
prompt's T5 and CLIP features (computed once by precompute) and the clip's own audio latent. These
functions turn samples into model inputs, run the self-augmentation mix on their frames, generate,
and write the audio; the verb (``pipelines/demo.py``) only parses arguments, calls them and prints.
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preprocessing.compact import decode_sync_mp4
from preprocessing.shard_reader import ShardSample
from selva.encoders import FrozenEncoders, build_encoders
from selva.generator import Generator
from selva.mixing import MixConfig, apply_to_batch
from selva.presets import ModelPreset, get_preset
from selva.sampling import Generated, generate_latents
from selva.textsynch import TextSynch


@dataclass
class GenerationModels:
    """A preset's frozen encoders (codec + text) and its two SELVA modules, in eval mode."""

    preset: ModelPreset
    encoders: FrozenEncoders
    textsynch: TextSynch
    generator: Generator


def untrained_models(preset_name: str, seed: int) -> GenerationModels:
    """The embedded encoders and randomly initialised TextSynch and generator of ``preset_name``.

    Seeds torch's global generator with ``seed`` first, so the random weights (and whatever the
    caller draws next from that generator) are the same on every run. Until training lands, this is
    the model the demo runs.
    """
    preset = get_preset(preset_name)
    torch.manual_seed(seed)
    encoders = build_encoders("embedded", preset)
    textsynch, generator = preset.build_textsynch().eval(), preset.build_generator().eval()
    return GenerationModels(preset, encoders, textsynch, generator)


def mixed_frames(samples: Sequence[ShardSample], mix: MixConfig, step: int = 0, rank: int = 0) -> dict:
    """The samples' sync frames as one batch, mixed as training mixes them.

    Returns :func:`selva.mixing.apply_to_batch`'s dict: ``"video_u8"`` (B, T, H, W, 3) uint8, ``"video"``
    (B, T, 3, H, W) float in [-1, 1], ``"text"`` (the prompts) and ``"mix"`` (a ``MixInfo``). All clips
    must have the same frame count and size (one dataset's clips do).
    """
    frames = torch.from_numpy(np.stack([decode_sync_mp4(s.sync_mp4) for s in samples]))
    batch = {"video_u8": frames, "text": [s.meta.text for s in samples]}
    return apply_to_batch(batch, mix, mix.generator(step=step, rank=rank))


def text_conditions(sample: ShardSample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t5 (1, L, Dt5) float32, t5_mask (1, L) bool, clip_text (1, 77, Dclip) float32) of a sample's prompt,
    as stored by precompute (fp16 on disk)."""
    arrays = sample.arrays
    t5 = torch.from_numpy(arrays["t5"].astype(np.float32))[None]
    t5_mask = torch.from_numpy(arrays["t5_mask"])[None]
    clip_text = torch.from_numpy(arrays["clip_text"].astype(np.float32))[None]
    return t5, t5_mask, clip_text


def generate_for_sample(
    models: GenerationModels, video: torch.Tensor, sample: ShardSample, *, steps: int = 25, cfg_strength: float = 4.5
) -> Generated:
    """Latents for one clip's ``video`` (1, T, 3, H, W) in [-1, 1] (mixed or not), asked for by ``sample``'s prompt.

    The starting noise is drawn from torch's global generator (see :func:`untrained_models`).
    """
    noise = torch.randn(1, models.preset.seq.latent_seq_len, models.preset.generator.latent_dim)
    t5, t5_mask, clip_text = text_conditions(sample)
    return generate_latents(
        models.textsynch, models.generator, video, t5, t5_mask, clip_text, noise, steps=steps, cfg_strength=cfg_strength
    )


def decode_audio(models: GenerationModels, latent: torch.Tensor) -> np.ndarray:
    """A (N, latent_dim) or (1, N, latent_dim) unnormalised latent -> mono waveform (samples,) float32
    at ``models.encoders.codec.sampling_rate``."""
    with torch.inference_mode():
        batch = latent if latent.dim() == 3 else latent[None]
        return models.encoders.codec.decode(batch)[0].numpy()


def sample_reference_audio(models: GenerationModels, sample: ShardSample) -> np.ndarray:
    """The clip's own stored latent (``latent_mean``) through the codec: what the model should aim for."""
    return decode_audio(models, torch.from_numpy(sample.arrays["latent_mean"]))


def write_wav(path: str | Path, waveform: np.ndarray, sample_rate: int) -> None:
    """Write a mono float waveform (clipped to [-1, 1]) as 16-bit PCM WAV, atomically (temp file + rename)."""
    path = Path(path)
    pcm = (np.clip(waveform, -1, 1) * 32767).astype("<i2").tobytes()
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    tmp.replace(path)
