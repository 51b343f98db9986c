"""What one precomputed sample holds: the contract between the precompute job, the shard format
and the training loader (DESIGN §6).

Tar members of a sample (WebDataset naming ``<key>.<field>``):

| member | content |
|---|---|
| ``json`` | ids and text (``SampleMeta``); no wall-clock values, so reruns give identical bytes |
| ``sync.mp4`` | the 25 fps clip at the preset's frame size, H.264 |
| ``audio.flac`` | mono waveform at the preset's rate, 16 or 44.1 kHz (peak-normalised for training) |
| ``latent_mean.npy``, ``latent_std.npy`` | codec posterior, (N, latent_dim) float32 |
| ``t5.npy``, ``t5_mask.npy`` | FLAN-T5 (or embedded) token features (L, D) float16 and mask (L,) bool |
| ``clip_text.npy`` | CLIP-H (or embedded) token features (77, D) float16 |
| ``sync_feat.npy`` | optional frozen Synchformer features (S*8, 768) float16 (baselines) |

Arrays are ``.npy`` read with ``allow_pickle=False``: reading a shard never runs code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# member name -> dtype stored in the shard (None: not an array)
ARRAY_FIELDS: dict[str, np.dtype] = {
    "latent_mean": np.dtype(np.float32),
    "latent_std": np.dtype(np.float32),
    "t5": np.dtype(np.float16),
    "t5_mask": np.dtype(np.bool_),
    "clip_text": np.dtype(np.float16),
}
OPTIONAL_ARRAY_FIELDS: dict[str, np.dtype] = {"sync_feat": np.dtype(np.float16)}
# Fields whose first axis varies per sample (prompt length); every other shape is fixed per shard.
# The loader pads these per batch and builds the mask from their lengths.
VARIABLE_LENGTH_FIELDS = frozenset({"t5", "t5_mask"})
MEDIA_FIELDS = ("sync.mp4", "audio.flac")


@dataclass
class SampleMeta:
    key: str
    source_id: str
    text: str
    start: float
    duration: float
    split: str
    shard: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleMeta:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class Sample:
    """A fully precomputed sample, ready to be written to a shard."""

    meta: SampleMeta
    sync_mp4: bytes
    audio_flac: bytes
    arrays: dict[str, np.ndarray]
