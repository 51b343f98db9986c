"""The reference weight rule: deterministic, weight-free parameters (reference README §2).

Every *parameter* of an official module gets ``uni(weight_salt + name, numel)`` (SplitMix64 over the
flat index, seeded by the CRC-32 of the string), scaled by a per-category formula and cast to
float32. Buffers keep their official constructor values and are not produced here.

``uni`` itself lives in the product module :mod:`selva.seeded_uniform` (the embedded text encoders
derive their fixed projections from it too); this module adds what only the reference rule needs:
categories, scaling, manifests.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from selva.seeded_uniform import CHUNK, crc32, parallel_chunks, uni, uni_into

__all__ = [
    "CATEGORIES",
    "CHUNK",
    "crc32",
    "iter_rule_tensors",
    "manifest",
    "rule_category",
    "rule_state_dict",
    "rule_tensor",
    "uni",
]

CATEGORIES = ("gain", "wn_gain", "bias", "fanin", "other")

Manifest = list[tuple[str, tuple[int, ...], str, str]]


def rule_category(name: str, shape: Sequence[int]) -> str:
    """The §2.2 category of a state_dict entry, tested in the README's order."""
    ndim = len(shape)
    parts = name.split(".")
    if name.endswith("latent_std") or (
        name.endswith(".weight") and ndim == 1 and len(parts) >= 2 and "norm" in parts[-2]
    ):
        return "gain"
    if name.endswith(".original0") or name.endswith(".weight_g"):
        return "wn_gain"
    if name.endswith("bias"):
        return "bias"
    if ndim >= 2 and (name.endswith("weight") or name.endswith(".original1") or name.endswith(".weight_v")):
        return "fanin"
    return "other"


def _mul(factor: float) -> Callable[[np.ndarray], None]:
    def mul(v: np.ndarray) -> None:
        v *= factor

    return mul


def _scaler(category: str, shape: Sequence[int], n: int) -> Callable[[np.ndarray], None]:
    """An in-place float64 transform implementing the category's formula, step by step as written."""
    if category == "gain":

        def gain(v: np.ndarray) -> None:
            v *= 0.1
            v += 1.0

        return gain
    if category == "wn_gain":

        def wn_gain(v: np.ndarray) -> None:
            v *= 0.1
            v += 1.0
            v *= 0.7

        return wn_gain
    if category == "bias":
        return _mul(0.1)
    if category == "fanin":
        fan_in = n // shape[0]  # integer division, as the spec says (ConvTranspose: out * k)
        factor = math.sqrt(3.0 / fan_in)
        return _mul(factor)
    if category == "other":
        return _mul(0.5)
    raise ValueError(f"unknown rule category {category!r}")


def rule_tensor(name: str, shape: Sequence[int], salt: str = "") -> torch.Tensor:
    """The float32 rule value of parameter ``name`` with ``shape``.

    The salt changes only the hashed string; the category and scaling use the bare name.
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)  # 1 for a 0-d tensor
    scale = _scaler(rule_category(name, shape), shape, n)
    seed = crc32(salt + name)
    out = np.empty(n, dtype=np.float32)

    def fill(s: int, e: int) -> None:
        v = np.empty(e - s, dtype=np.float64)
        uni_into(seed, s, v)
        scale(v)
        out[s:e] = v  # float64 -> float32 assignment rounds to nearest (IEEE default)

    parallel_chunks(n, fill)
    return torch.from_numpy(out.reshape(shape))


def manifest(directory: str | os.PathLike, model: str) -> Manifest:
    """The state_dict manifest ``<model>.keys.json``: (name, shape, dtype, kind) in state_dict order."""
    path = Path(directory) / f"{model}.keys.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest for model {model!r}: {path} does not exist")
    entries = json.loads(path.read_text())
    result: Manifest = []
    for entry in entries:
        name, shape, dtype, kind = entry
        if kind not in ("parameter", "buffer"):
            raise ValueError(f"{path}: entry {name!r} has unknown kind {kind!r}")
        result.append((str(name), tuple(int(s) for s in shape), str(dtype), str(kind)))
    return result


def iter_rule_tensors(
    directory: str | os.PathLike, model: str, salt: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, rule tensor) for every parameter of the manifest, in state_dict order, one at a time."""
    for name, shape, dtype, kind in manifest(directory, model):
        if kind != "parameter":
            continue
        if dtype != "float32":
            # The rule defines float32 values only; another dtype means a format we do not know.
            raise ValueError(f"{model}: parameter {name!r} has dtype {dtype}, the rule defines float32")
        yield name, rule_tensor(name, shape, salt)


def rule_state_dict(directory: str | os.PathLike, model: str, salt: str) -> dict[str, torch.Tensor]:
    """float32 rule tensors for every *parameter* of ``<model>.keys.json`` (buffers excluded)."""
    return dict(iter_rule_tensors(directory, model, salt))
