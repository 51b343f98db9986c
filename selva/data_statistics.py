"""Set a generator's data-dependent constants: latent statistics and the empty prompt's features.

MMAudio's generator holds three frozen parameters that come from the data, not from training:
``latent_mean``/``latent_std`` (1, 1, latent_dim), with which it normalises the codec latents it
learns to generate (``Generator.normalize``), and ``empty_string_feat`` (77, text_dim), the CLIP-slot
features of the empty prompt that replace the text under classifier-free-guidance dropout and in
the unconditional branch at inference. With the official encoders the released checkpoint carries
them; with any other codec or text encoder they must be computed for that codec and encoder, or
the latent scale and the unconditional text would be wrong (zeros for a text encoder whose "" is
not zero; mean 0 / std 1 for a codec whose latents are nothing like that).

Pure PyTorch; the dataset side (which values, from which files) is ``training.dataset_stats``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selva.generator import Generator


@dataclass(frozen=True)
class DataStatistics:
    """``latent_mean``, ``latent_std``: (latent_dim,); ``empty_text``: (text_seq_len, text_dim) CLIP-slot
    features of the empty prompt."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    empty_text: torch.Tensor


def apply_data_statistics(generator: Generator, stats: DataStatistics) -> None:
    """Copy ``stats`` into the generator's frozen parameters (cast to their dtype and device).

    Raises ValueError on a shape mismatch (statistics of another codec or preset) or a std that is
    not strictly positive (a constant channel would divide by zero in ``normalize``).
    """
    cfg = generator.cfg
    mean = torch.as_tensor(stats.latent_mean).reshape(-1)
    std = torch.as_tensor(stats.latent_std).reshape(-1)
    empty = torch.as_tensor(stats.empty_text)
    if mean.numel() != cfg.latent_dim or std.numel() != cfg.latent_dim:
        raise ValueError(
            f"latent statistics have {mean.numel()}/{std.numel()} channels; the generator's latents have "
            f"{cfg.latent_dim} (statistics of another codec or preset?)"
        )
    if not bool(torch.all(std > 0)) or not bool(torch.isfinite(std).all() and torch.isfinite(mean).all()):
        raise ValueError(f"latent std must be finite and > 0 in every channel, got min {float(std.min()):.3g}")
    if tuple(empty.shape) != tuple(generator.empty_string_feat.shape):
        raise ValueError(
            f"empty-prompt features have shape {tuple(empty.shape)}; the generator expects "
            f"{tuple(generator.empty_string_feat.shape)} (CLIP-slot tokens x width)"
        )
    with torch.no_grad():
        generator.latent_mean.copy_(mean.view(1, 1, -1))
        generator.latent_std.copy_(std.view(1, 1, -1))
        generator.empty_string_feat.copy_(empty)


def has_default_statistics(generator: Generator) -> bool:
    """True while the generator still holds its constructor's placeholders (mean 0, std 1, empty text 0):
    neither a checkpoint nor :func:`apply_data_statistics` has set them."""
    return bool(
        torch.all(generator.latent_mean == 0)
        and torch.all(generator.latent_std == 1)
        and torch.all(generator.empty_string_feat == 0)
    )
