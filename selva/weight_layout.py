"""The official weights folder's layout: the one registry of its file and folder names.

One folder (``--weights DIR``) mirrors the official SELVA/MMAudio release layout, so a user can point
at the folder they already downloaded. Names are the release's own:

```
DIR/
  weights/generator_small_16k_sup_5.pth     SELVA generator (stage-2 result; used by generation)
  weights/video_enc_sup_5.pth               SELVA TextSynch video encoder, 5 [SUP] tokens
  weights/mmaudio_small_16k.pth             MMAudio small 16 kHz generator (stage-2 init, stage-1 frozen)
  ext_weights/v1-16.pth                     MMAudio 16 kHz mel VAE
  ext_weights/best_netG.pt                  BigVGAN 16 kHz vocoder
  ext_weights/synchformer_state_dict.pth    Synchformer (MotionFormer backbone that initialises TextSynch)
  flan-t5-base/                             transformers folder of google/flan-t5-base
  clip-vit-h-14-384/                        open_clip files of apple/DFN5B-CLIP-ViT-H-14-384
```

The 44.1 kHz presets (``small_44k``, ``medium_44k``, ``large_44k``) share TextSynch, Synchformer and the
text encoders, and replace four files (SIZE = small, medium or large):

```
  weights/generator_SIZE_44k_sup_5.pth      SELVA generator
  weights/mmaudio_SIZE_44k.pth              MMAudio generator of the same size
  ext_weights/v1-44.pth                     MMAudio 44.1 kHz mel VAE
  ext_weights/bigvgan_v2_44khz_128band_512x/bigvgan_generator.pt   NVIDIA BigVGAN v2 (Hugging Face repo name)
```

This module imports nothing of the project, so both :mod:`selva.weights` (checking and loading) and
:mod:`selva.text` (the two text folders) read names from here without an import cycle. What lies
*inside* the text folders is the text package's business (``selva.text.t5``, ``selva.text.clip``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WeightFile:
    """One entry of the layout: ``path`` relative to the weights folder (a file or a folder), and what it is."""

    path: str
    what: str


OFFICIAL_FILES: dict[str, WeightFile] = {
    "selva_generator": WeightFile("weights/generator_small_16k_sup_5.pth", "SELVA generator (small 16 kHz)"),
    "textsynch": WeightFile("weights/video_enc_sup_5.pth", "SELVA TextSynch video encoder (5 [SUP] tokens)"),
    "mmaudio_generator": WeightFile("weights/mmaudio_small_16k.pth", "MMAudio small 16 kHz generator"),
    "vae": WeightFile("ext_weights/v1-16.pth", "MMAudio 16 kHz mel VAE"),
    "vocoder": WeightFile("ext_weights/best_netG.pt", "BigVGAN 16 kHz vocoder"),
    "synchformer": WeightFile("ext_weights/synchformer_state_dict.pth", "Synchformer (MotionFormer backbone)"),
    "flan_t5": WeightFile("flan-t5-base", "FLAN-T5-base transformers folder"),
    "clip": WeightFile("clip-vit-h-14-384", "DFN5B CLIP ViT-H-14-384 open_clip folder"),
}

# what each job needs
PRECOMPUTE_ROLES = ("vae", "flan_t5", "clip")  # precompute only encodes: no vocoder
GENERATE_ROLES = ("selva_generator", "textsynch", "vae", "vocoder", "flan_t5", "clip")

DEFAULT_PRESET = "small_16k"
_SIZES_44K = ("small", "medium", "large")


def official_files(preset: str = DEFAULT_PRESET) -> dict[str, WeightFile]:
    """The layout for one model preset: ``OFFICIAL_FILES`` for ``small_16k`` (and ``tiny``, whose export takes
    its names), with the 44.1 kHz presets' own generators, VAE and vocoder (``tiny_44k``: the small ones)."""
    size, _, rate = preset.partition("_")
    if rate != "44k":
        return dict(OFFICIAL_FILES)
    files = {
        **OFFICIAL_FILES,
        "vae": WeightFile("ext_weights/v1-44.pth", "MMAudio 44.1 kHz mel VAE"),
        "vocoder": WeightFile("ext_weights/bigvgan_v2_44khz_128band_512x/bigvgan_generator.pt",
                              "NVIDIA BigVGAN v2 44.1 kHz vocoder (bigvgan_v2_44khz_128band_512x)"),
    }
    # the released generators' names; a tiny_44k export is written under the small ones (its shapes are its
    # own, as tiny's export uses the small_16k names: weights/README.txt says so)
    size = size if size in _SIZES_44K else "small"
    files["selva_generator"] = WeightFile(f"weights/generator_{size}_44k_sup_5.pth",
                                          f"SELVA generator ({size} 44.1 kHz)")
    files["mmaudio_generator"] = WeightFile(f"weights/mmaudio_{size}_44k.pth", f"MMAudio {size} 44.1 kHz generator")
    return files


def official_path(weights_dir: str | os.PathLike, role: str, preset: str = DEFAULT_PRESET) -> Path:
    """Where ``role``'s file or folder lies under ``weights_dir`` for ``preset``; KeyError for an unknown role.

    Does not check that it exists (``selva.weights.require`` does, for a whole job at once).
    """
    return Path(weights_dir) / official_files(preset)[role].path
