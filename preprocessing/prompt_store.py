"""The dataset's text features: every distinct prompt encoded once, and the empty prompt.

A label dataset repeats few prompts over many clips (VGGSound: ~310 labels for ~180k clips), so the
precompute job encodes each distinct prompt once per *dataset* into this store before the shards
run; shard workers copy the features from here into their samples. Layout (``DATASET/text/``)::

    prompts-{digest}.json            index of a chunk, written LAST: {"prompts": [...], "t5_offsets": [...]}
    prompts-{digest}.t5.npy          (sum of token counts, D_t5) float16: each prompt's real tokens, in order
    prompts-{digest}.t5_mask.npy     (sum of token counts,) bool
    prompts-{digest}.clip_text.npy   (K, 77, D_clip) float16
    empty.t5.npy, empty.t5_mask.npy, empty.clip_text.npy     the empty prompt "" (same dtypes)

``digest`` hashes the chunk's sorted prompts. A chunk exists once its index exists (arrays first, then
the index, each written atomically), so a killed job leaves whole chunks or orphan arrays that the
next run deletes; a resumed job encodes only prompts that no index names. Per-prompt arrays are the
bytes the shards store (float16 real tokens, see ``preprocessing.sample``), so a sample's features
are the same whether its prompt came from the store or was encoded beside it.

The empty prompt is stored like every other prompt (float16 tokens): it becomes the generator's
``empty_string_feat`` parameter for classifier-free guidance (``training.dataset_stats``), the text the
model sees in place of prompts whose features it sees at float16 precision; one precision for both
keeps dropout from being recognisable by its rounding.

Everything is ``.npy`` read with ``allow_pickle=False`` plus JSON: the store is data, never code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.shards import atomic_target, write_json_atomic

TEXT_DIR = "text"
ROLES = ("t5", "t5_mask", "clip_text")
CHUNK_PREFIX = "prompts-"
# (t5 tokens (L, D) float16, t5 mask (L,) bool, clip tokens (77, D) float16): one prompt, as stored
PromptFeatures = tuple[np.ndarray, np.ndarray, np.ndarray]


def text_dir(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / TEXT_DIR


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def chunk_name(prompts: Iterable[str]) -> str:
    digest = hashlib.sha256(json.dumps(sorted(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"{CHUNK_PREFIX}{digest[:16]}"


def write_chunk(dataset_dir: str | Path, features: dict[str, PromptFeatures]) -> str:
    """Store ``features`` (prompt -> arrays) as one chunk; returns its name. Arrays first, index last."""
    prompts = sorted(features)
    if not prompts:
        raise ValueError("write_chunk: no prompts")
    name = chunk_name(prompts)
    folder = text_dir(dataset_dir)
    lengths = [len(features[p][0]) for p in prompts]
    arrays = {
        "t5": np.concatenate([features[p][0] for p in prompts]).astype(np.float16),
        "t5_mask": np.concatenate([features[p][1] for p in prompts]).astype(np.bool_),
        "clip_text": np.stack([features[p][2] for p in prompts]).astype(np.float16),
    }
    for role, array in arrays.items():
        _save_npy(folder / f"{name}.{role}.npy", array)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    write_json_atomic(folder / f"{name}.json", {"prompts": prompts, "t5_offsets": offsets})
    return name


def remove_orphan_arrays(dataset_dir: str | Path) -> list[Path]:
    """Delete chunk arrays without an index (a writer killed between the two); only when none runs."""
    folder = text_dir(dataset_dir)
    indexed = {p.stem for p in folder.glob(f"{CHUNK_PREFIX}*.json")}
    removed = []
    for path in folder.glob(f"{CHUNK_PREFIX}*.npy"):
        if path.name.split(".", 1)[0] not in indexed:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class PromptStore:
    """Read side: which prompts are stored, and their features (memory-mapped, copied out on read).

    The index is read lazily and re-read when asked for a prompt it does not know (chunks written
    since). One instance per worker process; not thread-safe.
    """

    def __init__(self, dataset_dir: str | Path):
        self.folder = text_dir(dataset_dir)
        self._where: dict[str, tuple[str, int]] = {}  # prompt -> (chunk, position in the chunk)
        self._offsets: dict[str, list[int]] = {}
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def refresh(self) -> None:
        for index in sorted(self.folder.glob(f"{CHUNK_PREFIX}*.json")):
            name = index.stem
            if name in self._offsets:
                continue
            data = json.loads(index.read_text(encoding="utf-8"))
            self._offsets[name] = [int(x) for x in data["t5_offsets"]]
            for i, prompt in enumerate(data["prompts"]):
                self._where.setdefault(prompt, (name, i))  # duplicates hold identical features

    def prompts(self) -> set[str]:
        self.refresh()
        return set(self._where)

    @property
    def chunks(self) -> int:
        self.refresh()
        return len(self._offsets)

    def _array(self, name: str, role: str) -> np.ndarray:
        key = (name, role)
        if key not in self._arrays:
            self._arrays[key] = _load_npy(self.folder / f"{name}.{role}.npy", mmap=True)
        return self._arrays[key]

    def get(self, prompt: str) -> PromptFeatures | None:
        """The stored features of ``prompt`` (fresh arrays), or None when no chunk holds it."""
        if prompt not in self._where:
            self.refresh()
            if prompt not in self._where:
                return None
        name, i = self._where[prompt]
        lo, hi = self._offsets[name][i], self._offsets[name][i + 1]
        return (
            np.array(self._array(name, "t5")[lo:hi]),
            np.array(self._array(name, "t5_mask")[lo:hi]),
            np.array(self._array(name, "clip_text")[i]),
        )


# -- the empty prompt --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmptyPrompt:
    """Features of "" from the dataset's encoders: t5 (L, D_t5) float16 real tokens, t5_mask (L,) bool,
    clip_text (77, D_clip) float16 (the generator's ``empty_string_feat`` shape)."""

    t5: np.ndarray
    t5_mask: np.ndarray
    clip_text: np.ndarray


def empty_prompt_files() -> dict[str, str]:
    """role -> path relative to the dataset folder (what ``dataset.json``'s ``empty_prompt`` records)."""
    return {role: f"{TEXT_DIR}/empty.{role}.npy" for role in ROLES}


def has_empty_prompt(dataset_dir: str | Path) -> bool:
    return all((Path(dataset_dir) / rel).is_file() for rel in empty_prompt_files().values())


def write_empty_prompt(dataset_dir: str | Path, empty: EmptyPrompt) -> None:
    arrays = {"t5": empty.t5.astype(np.float16), "t5_mask": empty.t5_mask.astype(np.bool_),
              "clip_text": empty.clip_text.astype(np.float16)}
    for role, rel in empty_prompt_files().items():
        _save_npy(Path(dataset_dir) / rel, arrays[role])


def read_empty_prompt(dataset_dir: str | Path, files: dict[str, str] | None = None) -> EmptyPrompt:
    """The empty prompt's features; ``files`` as recorded in ``dataset.json`` (default: the standard names)."""
    files = files or empty_prompt_files()
    missing = [role for role in ROLES if role not in files or not (Path(dataset_dir) / files[role]).is_file()]
    if missing:
        raise FileNotFoundError(f"{dataset_dir}: no empty-prompt features for {missing} (files {files})")
    arrays = {role: _load_npy(Path(dataset_dir) / files[role]) for role in ROLES}
    return EmptyPrompt(arrays["t5"], arrays["t5_mask"].astype(np.bool_), arrays["clip_text"])
