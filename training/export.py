"""The final export of a training run, and loading it (or official weights) back.

``OUT/final/`` is built in ``OUT/final.tmp-XXXX`` and renamed into place once complete; an existing
``final/`` is moved aside only then (the two renames leave a short window with no ``final/`` but a
``final.old-XXXX``, never a half-written ``final/``):

```
final/
  textsynch.safetensors, generator.safetensors   official key names and shapes, float32; metadata:
                                                 module, preset, ema ("true"/"false"), ema_sigma_rel
  config.yaml                                    the run's resolved config
  export.json                                    preset, modules, EMA per module, file names
  weights/video_enc_sup_5.pth                    flat state dicts under the release's own names, so
  weights/generator_small_16k_sup_5.pth          final/ works as ``--weights`` folder for these two
  weights/README.txt                             which preset the two files are for
```
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from selva.checkpoint import (
    CheckpointError,
    canonical_safetensors_header,
    check_saved_for,
    load_weights,
    read_metadata,
    skip_init,
)
from selva.generator import Generator
from selva.presets import ModelPreset, get_preset
from selva.textsynch import TextSynch
from selva.weight_layout import official_files, official_path
from selva.weights import load_generator, load_textsynch

MODULES = ("textsynch", "generator")
SAFETENSORS = {"textsynch": "textsynch.safetensors", "generator": "generator.safetensors"}
# the files official inference loads, by our module name (role in selva.weight_layout)
PTH_ROLES = {"textsynch": "textsynch", "generator": "selva_generator"}
# what init.<module>=OFFICIAL_FOLDER starts from (DESIGN §4: stage 2 starts from MMAudio's generator)
INIT_ROLES = {"textsynch": "textsynch", "generator": "mmaudio_generator"}


class ExportPathError(ValueError):
    """A path given as weights is none of the accepted kinds."""


def export_state(module: nn.Module, ema: Mapping[str, torch.Tensor] | None, source: str) -> dict[str, torch.Tensor]:
    """``module``'s state dict (CPU, float32 for floating tensors) with ``ema``'s entries put in its place.

    ``ema`` holds a subset of the keys (the trained parameters); the rest (frozen parts) keep their
    values. Raises ``ValueError`` naming ``source`` for an unknown key or a wrong shape."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    for name, value in (ema or {}).items():
        if name not in state:
            raise ValueError(f"{source}: EMA weight {name!r} is not a key of {type(module).__name__}")
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(f"{source}: EMA weight {name!r} has shape {tuple(value.shape)}, "
                             f"the module {tuple(state[name].shape)}")
        state[name] = value.detach().cpu()
    # official files are float32; clone so no two keys share storage (safetensors refuses shared tensors)
    return {k: (v.float() if v.is_floating_point() else v).clone().contiguous() for k, v in state.items()}


def export_final(
    out_dir: str | os.PathLike,
    *,
    textsynch: TextSynch,
    generator: Generator,
    preset_name: str,
    config: Mapping[str, Any],
    ema_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ema_sigma_rel: float | None = None,
    encoders: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/final/`` atomically and return its path.

    ``ema_weights`` maps ``"textsynch"``/``"generator"`` to synthesised weights (e.g.
    ``PostHocEMATracker.synthesize``) that replace that module's raw weights; ``ema_sigma_rel`` is
    recorded with them. ``encoders`` is the training dataset's ``encoders`` record (dataset.json): generation
    picks the same text encoders and codec from it. Raises ``ValueError`` for an unknown module name or EMA
    key, and YAML errors when ``config`` is not plain data, before anything in ``out_dir`` changes."""
    out_dir = Path(out_dir)
    ema_weights = dict(ema_weights or {})
    unknown = sorted(set(ema_weights) - set(MODULES))
    if unknown:
        raise ValueError(f"ema_weights for unknown modules {unknown}; expected {', '.join(MODULES)}")
    get_preset(preset_name)  # a name the loaders will know
    config_text = yaml.safe_dump(dict(config), sort_keys=False)
    modules = {"textsynch": textsynch, "generator": generator}
    states = {name: export_state(modules[name], ema_weights.get(name), f"export of {name}") for name in MODULES}

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="final.tmp-", dir=out_dir))
    final, old = out_dir / "final", None
    try:
        (tmp / "weights").mkdir()
        record: dict[str, Any] = {"preset": preset_name, "modules": {}}
        if encoders is not None:
            record["encoders"] = dict(encoders)
        for name in MODULES:
            ema = name in ema_weights
            meta = {"preset": preset_name, "ema": str(ema).lower()}
            if ema and ema_sigma_rel is not None:
                meta["ema_sigma_rel"] = repr(float(ema_sigma_rel))
            save_file(states[name], str(tmp / SAFETENSORS[name]),
                      metadata={"module": type(modules[name]).__name__, **meta})
            canonical_safetensors_header(tmp / SAFETENSORS[name])  # equal weights, equal bytes
            pth = official_path(tmp, PTH_ROLES[name], preset_name)  # the release's name for this size
            torch.save(states[name], pth)  # a flat dict of tensors: torch.load(weights_only=True) reads it
            record["modules"][name] = {**meta, "safetensors": SAFETENSORS[name],
                                       "pth": official_files(preset_name)[PTH_ROLES[name]].path}
        (tmp / "config.yaml").write_text(config_text)
        (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "weights" / "README.txt").write_text(
            f"SELVA weights exported by training/export.py for model preset {preset_name!r}.\n"
            "The file names are the official release's; "
            + (f"the shapes are the official {preset_name} ones.\n" if get_preset(preset_name).released else
               f"the shapes are those of preset {preset_name!r}, NOT the official release's: load them with "
               f"this project's --preset {preset_name}.\n"))
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix="final.old-", dir=out_dir))
            os.replace(final, old / "final")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old / "final", final)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _preset(preset: ModelPreset | str) -> ModelPreset:
    return get_preset(preset) if isinstance(preset, str) else preset


def _is_our_export(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in SAFETENSORS.values())


def _load_ours(kind: str, file: Path, preset: ModelPreset) -> nn.Module:
    with skip_init():  # load_weights is strict: it sets every tensor
        module = preset.build_textsynch() if kind == "textsynch" else preset.build_generator()
    load_weights(module, file, preset=preset.name)
    return module


def _load_official(kind: str, file: Path, preset: ModelPreset) -> nn.Module:
    if kind == "textsynch":
        return load_textsynch(file, preset)[0]  # drops the keys the release drops
    return load_generator(file, preset)


def load_export(path: str | os.PathLike, preset: ModelPreset | str) -> tuple[TextSynch, Generator]:
    """TextSynch and generator from one of our ``final/`` folders or an official weights folder
    (``weights/video_enc_sup_5.pth`` and ``weights/generator_small_16k_sup_5.pth``).

    Raises ``ExportPathError`` when ``path`` is neither, ``CheckpointError`` when a file does not fit
    ``preset``."""
    path, preset = Path(path), _preset(preset)
    if _is_our_export(path):
        return _load_ours("textsynch", path / SAFETENSORS["textsynch"], preset), \
            _load_ours("generator", path / SAFETENSORS["generator"], preset)
    files = {kind: official_path(path, role, preset.name) for kind, role in PTH_ROLES.items()}
    if path.is_dir() and all(f.is_file() for f in files.values()):
        return _load_official("textsynch", files["textsynch"], preset), \
            _load_official("generator", files["generator"], preset)
    raise ExportPathError(
        f"{path}: expected an export folder (final/ with {' and '.join(SAFETENSORS.values())}) or an official "
        f"weights folder (with {' and '.join(official_files(preset.name)[r].path for r in PTH_ROLES.values())})")


def _init_file(kind: str, path: Path, preset: ModelPreset) -> tuple[Path, bool]:
    """The weights file that ``init.<kind>=path`` names, and whether it is one of ours (safetensors with our
    metadata) rather than an official ``.pth``. Raises ``ExportPathError`` for any other path."""
    if _is_our_export(path):
        return path / SAFETENSORS[kind], True
    if path.is_file() and path.suffix == ".safetensors":
        if "module" not in read_metadata(path):
            raise ExportPathError(f"{path}: a .safetensors without this project's metadata; expected "
                                  f"{SAFETENSORS[kind]} from an export")
        return path, True
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return path, False
    official = official_path(path, INIT_ROLES[kind], preset.name)
    if path.is_dir() and official.is_file():
        return official, False
    raise ExportPathError(
        f"init.{kind}={path}: expected an export folder (final/ with {SAFETENSORS[kind]}), a .safetensors from "
        f"one, an official .pth, or an official weights folder with "
        f"{official_files(preset.name)[INIT_ROLES[kind]].path}")


def load_module_init(kind: str, path: str | os.PathLike, preset: ModelPreset | str) -> nn.Module:
    """The module for ``init.<kind>=PATH``; ``kind`` is ``"textsynch"`` or ``"generator"``.

    ``PATH`` may be our ``final/`` folder, one of our ``.safetensors`` files, an official ``.pth``, or an
    official weights folder (TextSynch from ``weights/video_enc_sup_5.pth``; the generator from MMAudio's
    ``weights/mmaudio_small_16k.pth``, the stage-2 start). Raises ``ExportPathError`` otherwise."""
    if kind not in MODULES:
        raise ValueError(f"unknown module {kind!r}; expected one of {', '.join(MODULES)}")
    preset = _preset(preset)
    file, ours = _init_file(kind, Path(path), preset)
    return _load_ours(kind, file, preset) if ours else _load_official(kind, file, preset)


def _weight_keys(path: Path) -> set[str]:
    """The tensor names in a weights file, without reading the tensors (safetensors header; a torch file
    memory-mapped). Raises ``CheckpointError`` for a file that is not a flat mapping of tensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return set(handle.keys())
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from None
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) torch file cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{path}: not a weights-only torch file (a DeepSpeed checkpoint? give final/ or an "
                              f"official .pth): {str(err).splitlines()[0]}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a flat mapping of names to tensors")
    return set(state)


def check_init_source(kind: str, path: str | os.PathLike, preset: ModelPreset | str) -> None:
    """Cheap check of ``init.<kind>=PATH`` (``kind``: textsynch, generator or backbone) before a job starts:
    the path is a form :func:`load_module_init` takes and the file holds that module's weights for
    ``preset`` (our metadata, or for official files key names). Reads no tensor data. Raises
    ``ExportPathError`` or ``CheckpointError`` naming the file; shapes are checked when the job loads it."""
    path, preset = Path(path), _preset(preset)
    if kind == "backbone":
        if not path.is_file():
            raise ExportPathError(f"{path}: expected Synchformer's weights file (.pth)")
        if not any(k.startswith("vfeat_extractor.") for k in _weight_keys(path)):
            raise CheckpointError(f"{path}: no 'vfeat_extractor.*' keys; is this Synchformer's state dict?")
        return
    if kind not in MODULES:
        raise ValueError(f"unknown module {kind!r}; expected one of {', '.join(MODULES)}, backbone")
    file, ours = _init_file(kind, path, preset)
    want = "TextSynch" if kind == "textsynch" else "Generator"
    if ours:
        check_saved_for(file, want, preset.name)
        return
    with torch.device("meta"):  # key names only: no memory, no initialisation
        module = preset.build_textsynch() if kind == "textsynch" else preset.build_generator()
    wanted = set(module.state_dict())
    missing = sorted(wanted - _weight_keys(file))  # what the strict load would miss
    if missing:
        raise CheckpointError(f"{file} is missing {len(missing)} of the {len(wanted)} {want} weights of preset "
                              f"{preset.name} (e.g. {', '.join(missing[:3])}): not that module's weights file")
