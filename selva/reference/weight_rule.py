"""The reference weight rule: deterministic, weight-free parameters (reference README §2).

Every *parameter* of an official module gets ``uni(weight_salt + name, numel)`` (SplitMix64 over the
flat index, seeded by the CRC-32 of the string), scaled by a per-category formula and cast to
float32. Buffers keep their official constructor values and are not produced here.

The models hold 100-170 M parameters, so the hash is vectorised with numpy ``uint64`` arithmetic
(which wraps modulo 2^64, exactly as the spec asks) and evaluated in fixed-size chunks to bound the
memory of the temporaries. Chunks are independent, so they are spread over a small thread pool:
numpy releases the GIL inside its ufuncs.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# 2^52: with k = z >> 11 (53 bits), 2 * (k * 2^-53) - 1 == (k - 2^52) * 2^-52 exactly, because both
# sides are exactly representable doubles. The integer form saves two passes over the data.
_HALF = np.int64(1 << 52)
_ULP = 2.0**-52

CHUNK = 1 << 20
"""Values per chunk: 8 MiB per uint64 temporary, small enough to stay cache friendly."""

CATEGORIES = ("gain", "wn_gain", "bias", "fanin", "other")

Manifest = list[tuple[str, tuple[int, ...], str, str]]


def crc32(text: str) -> int:
    """The IEEE CRC-32 of the UTF-8 bytes, unsigned (0..2^32-1): the SplitMix64 seed."""
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def _uni_into(seed: int, start: int, out: np.ndarray) -> None:
    """Write uni values for flat indices [start, start + len(out)) into the float64 array ``out``."""
    n = out.shape[0]
    z = np.arange(start + 1, start + n + 1, dtype=np.uint64)
    tmp = np.empty_like(z)
    z *= _GOLDEN
    z += np.uint64(seed)
    np.right_shift(z, np.uint64(30), out=tmp)
    z ^= tmp
    z *= _MIX1
    np.right_shift(z, np.uint64(27), out=tmp)
    z ^= tmp
    z *= _MIX2
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp
    z >>= np.uint64(11)  # 53 significant bits: fits int64 without loss
    k = z.view(np.int64)
    k -= _HALF
    np.multiply(k, _ULP, out=out)  # int64 -> float64 is exact below 2^53


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _chunked(n: int, fill: Callable[[int, int], None]) -> None:
    """Call ``fill(start, stop)`` for every chunk of [0, n), in parallel when there are several."""
    bounds = [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    if len(bounds) <= 1:
        for s, e in bounds:
            fill(s, e)
        return
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        # list() re-raises the first worker exception here.
        list(pool.map(lambda b: fill(*b), bounds))


def uni(name: str, n: int) -> np.ndarray:
    """``n`` float64 values in [-1, 1): SplitMix64 over the flat index, seeded by crc32(name)."""
    if n < 0:
        raise ValueError(f"uni: negative length {n}")
    seed = crc32(name)
    out = np.empty(n, dtype=np.float64)
    _chunked(n, lambda s, e: _uni_into(seed, s, out[s:e]))
    return out


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
        _uni_into(seed, s, v)
        scale(v)
        out[s:e] = v  # float64 -> float32 assignment rounds to nearest (IEEE default)

    _chunked(n, fill)
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
