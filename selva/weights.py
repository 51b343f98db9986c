"""Checking that the official weights folder holds what a job needs, and loading its files into our modules.

The folder's layout (``--weights DIR``, the release's own names) is registered in
:mod:`selva.weight_layout`; its names are re-exported here. Jobs call :func:`require` with the roles
they need *before* any work starts, and get one error that lists every missing file and where it
belongs. Nothing here downloads: weights are data on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from selva.checkpoint import load_strict, read_state_dict, skip_init
from selva.generator import Generator
from selva.presets import ModelPreset
from selva.text.clip import find_clip_weights
from selva.text.t5 import check_t5_folder
from selva.textsynch import TextSynch
from selva.weight_layout import (
    DEFAULT_PRESET,
    GENERATE_ROLES,
    OFFICIAL_FILES,
    PRECOMPUTE_ROLES,
    WeightFile,
    official_files,
    official_path,
)

__all__ = [
    "GENERATE_ROLES",
    "OFFICIAL_FILES",
    "PRECOMPUTE_ROLES",
    "MissingWeightsError",
    "WeightFile",
    "load_generator",
    "load_synchformer_backbone",
    "load_textsynch",
    "official_files",
    "require",
]


class MissingWeightsError(FileNotFoundError):
    pass


def require(
    weights_dir: str | os.PathLike | None, roles: tuple[str, ...] | list[str], preset: str = DEFAULT_PRESET
) -> dict[str, Path]:
    """Paths of ``roles`` under ``weights_dir`` for model ``preset``; raises one error naming every missing file."""
    files = official_files(preset)
    unknown = [r for r in roles if r not in OFFICIAL_FILES]
    if unknown:
        raise ValueError(f"unknown weight roles {unknown}; known: {', '.join(OFFICIAL_FILES)}")
    if weights_dir is None:
        raise MissingWeightsError(
            "official encoders need --weights DIR (the folder laid out as in docs/weights.md); "
            "use --encoders embedded to run without downloaded weights"
        )
    root = Path(weights_dir)
    paths = {role: official_path(root, role, preset) for role in roles}
    problems = []
    for role, path in paths.items():
        where = f"{files[role].what}; expected at DIR/{files[role].path}"
        if not path.exists():
            problems.append(f"  {path} is missing ({where})")
            continue
        # the text folders must also hold the right files; checked without loading anything
        checks = {"flan_t5": check_t5_folder, "clip": find_clip_weights}
        if role in checks:
            try:
                checks[role](path)
            except FileNotFoundError as err:
                problems.append(f"  {err}")
    if problems:
        raise MissingWeightsError(f"official weights under {root} are incomplete:\n" + "\n".join(problems))
    return paths


# Non-persistent buffers that some official generator checkpoints still carry; the official loader
# deletes them before loading, and so do we.
_GENERATOR_DERIVED = ("latent_rot", "clip_rot", "t_embed.freqs")
# TextSynch.load_state_dict in the release keeps only these prefixes and drops the rest.
_TEXTSYNCH_PREFIXES = (
    "vfeat_extractor.", "text_proj.", "synch_text_cross_blocks.", "sup_text_feat", "empty_string_feat"
)


def load_generator(path: str | os.PathLike, preset: ModelPreset) -> Generator:
    state = {k: v for k, v in read_state_dict(path).items() if k not in _GENERATOR_DERIVED}
    with skip_init():  # load_strict sets every tensor
        generator = preset.build_generator()
    load_strict(generator, state, str(path))
    return generator


def load_textsynch(path: str | os.PathLike, preset: ModelPreset) -> tuple[TextSynch, list[str]]:
    """Load SELVA's TextSynch; returns the module and the checkpoint keys dropped (as the release does)."""
    state = read_state_dict(path)
    kept = {k: v for k, v in state.items() if k.startswith(_TEXTSYNCH_PREFIXES)}
    with skip_init():  # load_strict sets every tensor
        textsynch = preset.build_textsynch()
    load_strict(textsynch, kept, str(path))
    return textsynch, sorted(set(state) - set(kept))


def load_synchformer_backbone(textsynch: TextSynch, path: str | os.PathLike) -> None:
    """Initialise TextSynch's MotionFormer from Synchformer's ``vfeat_extractor.*`` weights (stage 1 start)."""
    prefix = "vfeat_extractor."
    state = read_state_dict(path)
    backbone = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not backbone:
        raise ValueError(f"{path}: no '{prefix}*' keys; is this Synchformer's state dict?")
    load_strict(textsynch.vfeat_extractor, backbone, f"{path} ({prefix}*)")
