"""The one interface every frozen text encoder offers: prompts in, per-token features + mask out.

SELVA reads text twice: FLAN-T5 states for TextSynch (variable length, boolean mask) and CLIP-H
per-token states for the generator (always 77 tokens). Both slots can be filled by the official
encoders or by the embedded MiniLM stand-in, so precompute, training and generation only ever see
:class:`TextEncoder` and :class:`TextFeatures`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class TextFeatures:
    """Per-token text features of a batch of prompts.

    ``tokens`` is a float tensor (B, L, D); ``mask`` is a bool tensor (B, L), True = real token.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"text tokens must be (B, L, D), got shape {tuple(self.tokens.shape)}")
        if not self.tokens.is_floating_point():
            raise ValueError(f"text tokens must be a float tensor, got {self.tokens.dtype}")
        if self.mask.dtype != torch.bool:
            # Official release bugs came from 0/1 float masks used as additive masks: keep them boolean.
            raise ValueError(f"text mask must be a bool tensor, got {self.mask.dtype}")
        if tuple(self.mask.shape) != tuple(self.tokens.shape[:2]):
            raise ValueError(
                f"text mask shape {tuple(self.mask.shape)} does not match tokens {tuple(self.tokens.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[2])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextFeatures:
        """Move the tokens (and mask) to ``device``; ``dtype`` applies to the tokens only."""
        return TextFeatures(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device))


def check_prompts(texts: object) -> list[str]:
    """``texts`` as a list of str, or a ValueError naming the first bad prompt by its index."""
    if isinstance(texts, str | bytes):
        # A bare string is a sequence of characters: encoding it would silently give one prompt per letter.
        raise ValueError(f"prompts must be a list of strings, got a single {type(texts).__name__}: {texts!r}")
    if not isinstance(texts, Sequence):
        raise ValueError(f"prompts must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"prompt {i} is {type(text).__name__} ({text!r}); every prompt must be a str")
    return list(texts)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the text encoders are never trained."""
    module.eval()
    module.requires_grad_(False)
    return module


def find_files(folder: str | Path, what: str, hint: str, wanted: dict[str, tuple[str, ...]]) -> dict[str, Path]:
    """For each role of ``wanted`` (role -> acceptable file names, first found wins) the file in
    ``folder``; a FileNotFoundError naming the folder, the missing role and what would do.

    ``what`` names the folder for people ("FLAN-T5"), ``hint`` says where its files come from.
    """
    folder = Path(folder)

    def options(names: tuple[str, ...]) -> str:
        return " or ".join(names)

    if not folder.is_dir():
        listing = ", ".join(f"{role} ({options(names)})" for role, names in wanted.items())
        raise FileNotFoundError(f"{what} folder {folder} does not exist; it should hold {hint}: {listing}")
    found = {}
    for role, names in wanted.items():
        path = next((folder / name for name in names if (folder / name).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{what} folder {folder} has no {role}: expected {options(names)} ({hint})")
        found[role] = path
    return found


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


class TextEncoder(ABC):
    """A frozen text encoder: ``encode(prompts) -> TextFeatures``.

    Attributes set by every subclass:

    - ``dim``: the feature width D.
    - ``max_length``: the most tokens one prompt can give (None: no cap).
    - ``fixed_length``: True when every prompt gives exactly ``max_length`` tokens (the CLIP slot).

    Encoders are not ``nn.Module``s on purpose: a frozen encoder inside a trained module would be moved,
    wrapped by DeepSpeed and written into its checkpoints.
    """

    dim: int
    max_length: int | None
    fixed_length: bool = False

    def __init__(self) -> None:
        self._empty: TextFeatures | None = None

    @abstractmethod
    def _encode(self, texts: list[str]) -> TextFeatures:
        """Encode a non-empty, validated list of prompts; runs under ``torch.inference_mode``."""

    @abstractmethod
    def modules(self) -> list[nn.Module]:
        """The modules holding this encoder's weights and buffers (moved by :meth:`to`)."""

    @property
    def device(self) -> torch.device:
        return module_device(self.modules()[0])

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoder to ``device`` (in place) and return it."""
        for module in self.modules():
            module.to(device)
        self._empty = None  # cached on the old device
        return self

    def encode(self, texts: Sequence[str]) -> TextFeatures:
        """Features of ``texts`` on the encoder's device: tokens float32 (B, L, dim), mask bool (B, L)."""
        prompts = check_prompts(texts)
        if not prompts:
            length = self.max_length if self.fixed_length and self.max_length is not None else 0
            tokens = torch.zeros(0, length, self.dim, device=self.device)
            return TextFeatures(tokens, torch.zeros(0, length, dtype=torch.bool, device=self.device))
        with torch.inference_mode():
            features = self._encode(prompts)
        # Tensors made under inference_mode cannot be saved for backward; training feeds these features
        # into trainable layers, so hand back ordinary tensors (the clone costs little next to the encoder).
        return TextFeatures(features.tokens.float().clone(), features.mask.clone())

    def empty(self) -> TextFeatures:
        """Features of the empty prompt "" (B = 1): the unconditional text comes from the same encoder."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty
