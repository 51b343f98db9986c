"""Deterministic pseudo-random values named by a string: ``uni(name, n)``, the same on every machine.

``uni`` is SplitMix64 over the flat index ``1..n``, seeded by the CRC-32 of ``name``, mapped to
float64 in [-1, 1). It is the hash of the reference weight rule (reference README §2.1,
:mod:`selva.reference.weight_rule`) and the source of the embedded text encoders' fixed projections
(:mod:`selva.text.embedded`), which is why it lives in the product library and not in the reference
checker: features precomputed on one machine must match another's without any stored file.

Models hold 100-170 M parameters, so the hash is vectorised with numpy ``uint64`` arithmetic (which
wraps modulo 2^64, exactly as the spec asks) and evaluated in fixed-size chunks to bound the memory
of the temporaries. Chunks are independent, so they are spread over a small thread pool: numpy
releases the GIL inside its ufuncs.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# 2^52: with k = z >> 11 (53 bits), 2 * (k * 2^-53) - 1 == (k - 2^52) * 2^-52 exactly, because both
# sides are exactly representable doubles. The integer form saves two passes over the data.
_HALF = np.int64(1 << 52)
_ULP = 2.0**-52

CHUNK = 1 << 20
"""Values per chunk: 8 MiB per uint64 temporary, small enough to stay cache friendly."""


def crc32(text: str) -> int:
    """The IEEE CRC-32 of the UTF-8 bytes, unsigned (0..2^32-1): the SplitMix64 seed."""
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def uni_into(seed: int, start: int, out: np.ndarray) -> None:
    """Write the values of flat indices ``[start, start + len(out))`` for ``seed`` into float64 ``out``."""
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


def parallel_chunks(n: int, fill: Callable[[int, int], None]) -> None:
    """Call ``fill(start, stop)`` for every ``CHUNK``-sized piece of ``[0, n)``, on threads when there are several.

    The first exception raised by ``fill`` propagates.
    """
    bounds = [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    if len(bounds) <= 1:
        for s, e in bounds:
            fill(s, e)
        return
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        # list() re-raises the first worker exception here.
        list(pool.map(lambda b: fill(*b), bounds))


def uni(name: str, n: int) -> np.ndarray:
    """``n`` float64 values in [-1, 1): SplitMix64 over the flat index, seeded by ``crc32(name)``.

    Raises ValueError for a negative ``n``.
    """
    if n < 0:
        raise ValueError(f"uni: negative length {n}")
    seed = crc32(name)
    out = np.empty(n, dtype=np.float64)
    parallel_chunks(n, lambda s, e: uni_into(seed, s, out[s:e]))
    return out
