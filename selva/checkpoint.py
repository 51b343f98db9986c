"""Strict, safe loading of weights with the official key names, and our own checkpoints.

Released checkpoints are data, never code: files are read with ``torch.load(weights_only=True)`` or
safetensors. Loading is strict: a missing, unexpected or misshaped key fails with a message that
names the key and the file, so a user who points at the wrong checkpoint learns which and why.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn


class CheckpointError(ValueError):
    """A weight file does not match the module it is loaded into."""


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                   "kaiming_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Build modules without ``torch.nn.init``'s random fills, for a strict load that follows: it sets every
    parameter and persistent buffer, so the fills were wasted (measured ~19 s of uniform draws for the
    official TextSynch + generator on 2 CPU cores). Buffers computed in constructors are untouched.
    Only for modules whose weights are all loaded right after; not thread-safe (it patches torch.nn.init)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _limited(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never executing pickled code.

    ``key`` selects a nested dict inside a torch checkpoint (for example ``"generator"`` in BigVGAN's
    ``best_netG.pt`` or ``"weights"`` in our own training checkpoints).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: cannot be read as a weights-only torch file: {err}") from err
    if key is not None:
        if not isinstance(state, Mapping) or key not in state:
            raise CheckpointError(f"{path}: no entry {key!r} in the checkpoint")
        state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a flat mapping of names to tensors")
    return dict(state)


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` into ``module``; every persistent key must be present with its shape.

    ``source`` names where the weights came from (a file path, or a description) and appears in
    every error. ``ignore_unexpected`` lists key prefixes that may be present and are dropped
    (for example non-persistent buffers that some official checkpoints carry).
    """
    expected = module.state_dict()
    ignore = tuple(ignore_unexpected)
    given = {k: v for k, v in state_dict.items() if not (ignore and k.startswith(ignore))}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k}: file has {tuple(given[k].shape)}, model expects {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_limited(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_limited(unexpected)}")
    if misshaped:
        problems.append("misshaped keys: " + "; ".join(misshaped[:8]))
    if problems:
        raise CheckpointError(
            f"{source} does not match {type(module).__name__}: " + " | ".join(problems)
        )
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            value = given[name]
            if value.dtype != tensor.dtype and tensor.dtype.is_floating_point:
                value = value.to(tensor.dtype)
            tensor.copy_(value)


def save_weights(module: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save our own weights as safetensors, atomically (temporary name, then rename).

    The metadata always records ``module`` (the class, e.g. ``Generator``); pass ``preset`` too, so
    :func:`load_weights` can tell a wrong file from a wrong model with a clear message."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(tmp), metadata={"module": type(module).__name__, **dict(metadata or {})})
    canonical_safetensors_header(tmp)
    os.replace(tmp, path)


def canonical_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a ``.safetensors`` header in place with its keys sorted, so that equal tensors and metadata
    give equal bytes. safetensors writes its header map in an unordered (per-process) order: two
    exports of the same weights differed by checksum. Same JSON content, so the length cannot grow;
    a shorter dump is padded with spaces, which the format allows at the header's end."""
    import json
    import struct

    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        sorted_header = dict(sorted(header.items()))
        if "__metadata__" in sorted_header:
            sorted_header["__metadata__"] = dict(sorted(sorted_header["__metadata__"].items()))
        text = json.dumps(sorted_header, separators=(",", ":")).encode()
        if len(text) > length:  # cannot happen for the same content; never corrupt a file over it
            return
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file ({} for other files or none)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_weights(module: nn.Module, path: str | os.PathLike, *, preset: str | None = None) -> None:
    """Load weights saved by :func:`save_weights` (or any file with the official key names).

    Raises ``CheckpointError`` naming the file when its recorded ``module`` is another class, or its
    recorded ``preset`` differs from ``preset`` (when given), before comparing keys."""
    check_saved_for(path, type(module).__name__, preset)
    load_strict(module, read_state_dict(path), str(path))


def check_saved_for(path: str | os.PathLike, module: str, preset: str | None) -> None:
    """Raise ``CheckpointError`` when the metadata of ``path`` names another module class than ``module``
    or another preset than ``preset`` (when both are recorded/given). Reads the header only."""
    meta = read_metadata(path)
    kind = meta.get("module")
    if kind is not None and kind != module:
        raise CheckpointError(f"{path} holds {kind} weights, not {module} weights")
    saved_preset = meta.get("preset")
    if preset is not None and saved_preset is not None and saved_preset != preset:
        raise CheckpointError(f"{path} was saved for preset {saved_preset!r}; this model is preset {preset!r}")
