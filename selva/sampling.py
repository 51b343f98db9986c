"""Latent generation with classifier-free guidance, exactly as the official SELVA ``generate``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from selva.flow_matching import FlowMatching
from selva.generator import Generator


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
