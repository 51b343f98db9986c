"""Case inputs of a reference directory (reference README §3 and §7.2).

Formula inputs are ``float32(offset + scale * uni(salt + name, numel))`` from ``inputs.json``. Every
one we build is verified against the ``first4``/``sum``/``sumsq`` that ``inputs.json`` records, so a
wrong hash or formula fails loudly here instead of showing up as a mysterious output mismatch.

A case maps roles to references: a formula input name, a slice of one, a tensor stored in a
safetensors file of the directory, or literal values (a ``mask`` or the timesteps ``t``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selva.reference.weight_rule import uni

# sum/sumsq of float32 values accumulated in float64: different summation orders differ by about
# n * 2^-53 relative to the sum of magnitudes, far below this. A wrong formula is off by far more.
_SUM_RTOL = 1e-9


class InputError(ValueError):
    """An input reference cannot be resolved, or a built input disagrees with ``inputs.json``."""


@dataclass(frozen=True)
class InputSpec:
    """One formula input of ``inputs.json``."""

    name: str
    shape: tuple[int, ...]
    scale: float
    offset: float
    first4: tuple[float, ...] | None = None
    sum: float | None = None
    sumsq: float | None = None

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> InputSpec:
        try:
            return cls(
                name=str(entry["name"]),
                shape=tuple(int(s) for s in entry["shape"]),
                scale=float(entry["scale"]),
                offset=float(entry["offset"]),
                first4=tuple(float(x) for x in entry["first4"]) if "first4" in entry else None,
                sum=float(entry["sum"]) if "sum" in entry else None,
                sumsq=float(entry["sumsq"]) if "sumsq" in entry else None,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"malformed inputs.json entry {entry!r}: {err}") from err


def formula_input(spec: InputSpec, salt: str) -> torch.Tensor:
    """The float32 input: ``scale * v`` in float64, then ``+ offset``, then cast (as §3 says)."""
    v = uni(salt + spec.name, math.prod(spec.shape))
    v *= spec.scale
    v += spec.offset
    return torch.from_numpy(v.astype(np.float32).reshape(spec.shape))


def verify_input(spec: InputSpec, tensor: torch.Tensor) -> None:
    """Compare a built input with the statistics recorded in ``inputs.json``; raise on mismatch."""
    flat = tensor.detach().reshape(-1).numpy()
    problems = []
    if tuple(tensor.shape) != spec.shape:
        problems.append(f"shape {tuple(tensor.shape)} != {spec.shape}")
    if spec.first4 is not None:
        ours = [float(x) for x in flat[: len(spec.first4)]]
        if ours != list(spec.first4):  # float32 -> float64 is exact, so this is an exact check
            problems.append(f"first4 {ours} != {list(spec.first4)}")
    as64 = flat.astype(np.float64)
    if spec.sum is not None:
        ours_sum = float(as64.sum())
        if abs(ours_sum - spec.sum) > _SUM_RTOL * float(np.abs(as64).sum()) + 1e-300:
            problems.append(f"sum {ours_sum!r} != {spec.sum!r}")
    if spec.sumsq is not None:
        ours_sumsq = float(np.dot(as64, as64))
        if abs(ours_sumsq - spec.sumsq) > _SUM_RTOL * abs(spec.sumsq) + 1e-300:
            problems.append(f"sumsq {ours_sumsq!r} != {spec.sumsq!r}")
    if problems:
        raise InputError(
            f"input {spec.name!r} built by the §3 formula disagrees with inputs.json: " + "; ".join(problems)
        )


_SELFCHECK_KEY = re.compile(r'^uni\((".*"),\s*(\d+)\)$')


def verify_uni_selfcheck(data: dict[str, Any]) -> int:
    """Check ``uni`` against the ``uni_selfcheck`` block of an ``inputs.json``; return checks made.

    Keys look like ``uni("abc", 5)``; keys in another form are ignored (nothing to compare with).
    """
    checked = 0
    for key, expected in (data.get("uni_selfcheck") or {}).items():
        match = _SELFCHECK_KEY.match(key)
        if match is None:
            continue
        name, n = json.loads(match.group(1)), int(match.group(2))
        ours = uni(name, n).tolist()
        if ours != [float(x) for x in expected]:
            raise InputError(f"hash self-check failed: {key} gave {ours}, inputs.json says {expected}")
        checked += 1
    return checked


class InputSet:
    """The inputs of one reference directory: builds, verifies and caches formula inputs."""

    def __init__(self, directory: str | os.PathLike, filename: str = "inputs.json", verify: bool = True):
        self.directory = Path(directory)
        path = self.directory / filename
        if not path.is_file():
            raise InputError(f"input file not found: {path}")
        data = json.loads(path.read_text())
        self.salt: str = str(data.get("salt", ""))
        self.specs: dict[str, InputSpec] = {}
        for entry in data.get("inputs", []):
            spec = InputSpec.from_json(entry)
            self.specs[spec.name] = spec
        self.verify = verify
        if verify:
            verify_uni_selfcheck(data)
        self._cache: dict[str, torch.Tensor] = {}

    def formula(self, name: str) -> torch.Tensor:
        """The float32 formula input ``name`` (cached; callers get their own copy via ``resolve``)."""
        if name not in self._cache:
            spec = self.specs.get(name)
            if spec is None:
                raise InputError(f"input {name!r} is not listed in inputs.json")
            tensor = formula_input(spec, self.salt)
            if self.verify:
                verify_input(spec, tensor)
            self._cache[name] = tensor
        return self._cache[name]

    def stored(self, file: str, key: str) -> torch.Tensor:
        """Tensor ``key`` of safetensors ``file`` in this directory, with its stored dtype."""
        from safetensors import safe_open

        path = self.directory / file
        if not path.is_file():
            raise InputError(f"input file not found: {path}")
        with safe_open(str(path), framework="pt") as handle:
            if key not in handle.keys():
                raise InputError(f"{path} has no tensor {key!r}")
            return handle.get_tensor(key)

    def resolve(self, role: str, ref: Any, dtype: torch.dtype | None) -> torch.Tensor:
        """One role's tensor for a run in ``dtype`` (``None``: leave formula inputs in float32).

        Every call returns a fresh tensor, so a runner that modifies its inputs cannot affect
        another run.
        """
        if isinstance(ref, str):
            return self._cast(self.formula(ref), dtype)
        if isinstance(ref, dict) and "name" in ref:
            base = self.formula(str(ref["name"]))
            try:
                dim, start, stop = int(ref["dim"]), int(ref["start"]), int(ref["stop"])
            except (KeyError, TypeError, ValueError) as err:
                raise InputError(
                    f"role {role!r}: slice reference needs integer dim/start/stop: {ref!r}"
                ) from err
            if not (-base.dim() <= dim < base.dim()) or not (0 <= start <= stop <= base.shape[dim]):
                raise InputError(
                    f"role {role!r}: slice {ref!r} is out of range for shape {tuple(base.shape)}"
                )
            return self._cast(base.narrow(dim, start, stop - start), dtype)
        if isinstance(ref, dict) and "file" in ref:
            if "key" not in ref:
                raise InputError(f"role {role!r}: file reference without a key: {ref!r}")
            return self.stored(str(ref["file"]), str(ref["key"]))
        if isinstance(ref, list):
            return literal_input(role, ref, dtype)
        raise InputError(f"role {role!r}: unknown input reference {ref!r}")

    def resolve_all(self, refs: dict[str, Any], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        return {role: self.resolve(role, ref, dtype) for role, ref in refs.items()}

    @staticmethod
    def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        # float32 values cast up for float64 runs; clone() so the cached tensor is never shared.
        if dtype is None or dtype == tensor.dtype:
            return tensor.clone(memory_format=torch.contiguous_format)
        return tensor.to(dtype).contiguous()


def literal_input(role: str, values: list[Any], dtype: torch.dtype | None) -> torch.Tensor:
    """A JSON array input: ``mask`` rows of 0/1 -> bool (B, L); ``t`` -> (B,) of the run dtype."""
    if role == "mask":
        rows = values
        if not rows or not all(isinstance(r, list) for r in rows):
            raise InputError(f"mask must be a non-empty list of rows of 0/1, got {values!r}")
        if len({len(r) for r in rows}) != 1:
            raise InputError(f"mask rows have different lengths: {values!r}")
        if any(x not in (0, 1) for r in rows for x in r):
            raise InputError(f"mask entries must be 0 or 1: {values!r}")
        return torch.tensor(rows, dtype=torch.bool)
    if role == "t":
        if dtype is None:
            raise InputError("timesteps 't' need a run dtype, but this run has none")
        if not values or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
            raise InputError(f"t must be a non-empty list of numbers, got {values!r}")
        # Built directly in the run dtype: 0.3 in a float64 run is the double 0.3, not float32(0.3).
        return torch.tensor([float(x) for x in values], dtype=dtype)
    raise InputError(f"role {role!r}: literal values are defined only for 'mask' and 't'")
