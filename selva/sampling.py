"""Latent generation with classifier-free guidance, exactly as the official SELVA ``generate``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from selva.flow_matching import FlowMatching
from selva.generator import Generator
from selva.textsynch import TextSynch


def sample_latents(
    generator: Generator,
    noise: torch.Tensor,
    sync_f: torch.Tensor,
    text_f: torch.Tensor,
    *,
    steps: int = 25,
    cfg_strength: float = 4.5,
    negative_text: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` (B, N, latent_dim) to a normalised latent.

    The CLIP visual stream is always the learned empty sequence (SELVA conditions on TextSynch sync
    features and CLIP text only). The unconditional branch is ``get_empty_conditions``.
    Call ``generator.unnormalize`` on the result before decoding it.
    """
    bs = noise.shape[0]
    cond = generator.preprocess_conditions(generator.empty_clip_sequence(bs), sync_f, text_f)
    empty = generator.get_empty_conditions(bs, negative_text)

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t_batch = t * torch.ones(len(x), device=x.device, dtype=x.dtype)
        return generator.cfg_flow(x, t_batch, cond, empty, cfg_strength)

    return FlowMatching(min_sigma=0.0, num_steps=steps).to_data(velocity, noise, on_step)


@dataclass(frozen=True)
class Generated:
    """What :func:`generate_latents` produced: ``sync`` (B, S*8, D) TextSynch features and ``latent``
    (B, N, latent_dim), unnormalised (ready for a codec's ``decode``)."""

    sync: torch.Tensor
    latent: torch.Tensor


def generate_latents(
    textsynch: TextSynch,
    generator: Generator,
    video: torch.Tensor,
    t5: torch.Tensor,
    t5_mask: torch.Tensor,
    clip_text: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int = 25,
    cfg_strength: float = 4.5,
    negative_text: torch.Tensor | None = None,
    text_in_encoder: bool = True,
) -> Generated:
    """Both SELVA stages at inference: TextSynch on the video, then :func:`sample_latents`.

    ``video`` (B, T, 3, H, W) in [-1, 1]; ``t5`` (B, L, Dt5) with its bool mask (B, L); ``clip_text``
    (B, 77, Dclip); ``noise`` (B, N, latent_dim) is the starting point, drawn by the caller so that
    its random stream is the caller's choice. ``negative_text`` (1 or B, 77, Dclip): CLIP text features
    of a negative prompt for the unconditional branch (:func:`sample_latents`). ``text_in_encoder``
    False: the video features without text (``TextSynch.encode_video_without_text``; ``t5`` unused), for a
    generator trained on them (MMAudio-style). Runs without autograd.
    """
    with torch.inference_mode():
        sync = textsynch(video, t5, t5_mask) if text_in_encoder else textsynch.encode_video_without_text(video)
        latent = sample_latents(generator, noise, sync, clip_text, steps=steps, cfg_strength=cfg_strength,
                                negative_text=negative_text)
        return Generated(sync, generator.unnormalize(latent))
