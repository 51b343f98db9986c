"""The checkpoint protocol: every rank's state, a marker written last, resume from the newest complete one.

``OUT/checkpoints/step-00000120/`` holds

- DeepSpeed's own files (``mp_rank_00_model_states.pt`` from rank 0, ``zero_pp_rank_R_*optim_states.pt``
  from every rank): the trained parameters and the partitioned optimizer state;
- ``trainer-rank00000.json`` per rank: the step, the loader's ``state_dict`` taken *after* the step's
  optimizer update (DeepSpeed's ``client_state`` is written by rank 0 only, which would lose every
  other rank's data position), the global RNG states and counters; JSON, never pickle;
- ``ema.pt`` (rank 0): the post-hoc EMA state (tensors only, read with ``weights_only=True``);
- ``complete.json``, written by rank 0 **after a barrier** over all ranks: step, world size, the
  config and dataset fingerprints, the MLflow run id. A folder without it (a job killed while saving)
  is ignored and removed by the next save; DeepSpeed's ``latest`` file is neither written nor read.

Only the last ``keep`` complete checkpoints are kept. ``resume=auto`` takes the newest complete one
and refuses, naming what changed, when the world size, the resolved config or the dataset changed.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "complete.json"
PREFIX = "step-"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed exactly; the message says what differs and what to do."""


def tag(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"trainer-rank{rank:05d}.json"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Global RNG states of this process as JSON: torch CPU (and CUDA), NumPy, Python ``random``.

    The trainer draws its own numbers from per-sample generators (training/objective.py); these
    cover anything else that draws from the globals (a library, a future dropout layer)."""
    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


# -------------------------------------------------------------------------------- finding
@dataclass(frozen=True)
class Found:
    folder: Path
    step: int
    marker: dict[str, Any]


def complete_checkpoints(root: Path) -> list[Found]:
    """Complete checkpoints under ``root``, oldest first."""
    out = []
    if not root.is_dir():
        return out
    for folder in root.iterdir():
        if not (folder.name.startswith(PREFIX) and folder.is_dir()):
            continue
        found = read_checkpoint(folder)
        if found is not None:
            out.append(found)
    return sorted(out, key=lambda f: f.step)


def read_checkpoint(folder: Path) -> Found | None:
    """The complete checkpoint in ``folder`` (any name: ``resume=PATH`` may name a copy), or None when it
    has no readable marker (a marker is written atomically; an unreadable one is not ours)."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
        return Found(folder, int(data["step"]), data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resumable(found: Found, *, world_size: int, config_hash: str, config: dict[str, str],
                    dataset_fingerprint: str) -> None:
    """Raise :class:`ResumeError` naming every difference that would make the resume inexact."""
    m = found.marker
    problems = []
    if m["world_size"] != world_size:
        problems.append(f"world size {m['world_size']} -> {world_size} (each rank's data position and "
                        f"optimizer partition belong to the old layout)")
    if m["dataset"] != dataset_fingerprint:
        problems.append("the dataset (shard lists or manifests) changed")
    if m["config_hash"] != config_hash:
        old = m.get("config", {})
        keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in keys[:6])
        problems.append(f"the config changed ({shown}{', ...' if len(keys) > 6 else ''})")
    if problems:
        raise ResumeError(
            f"cannot resume exactly from {found.folder}: " + "; ".join(problems)
            + ". Use the original settings, or start a new run with another out=DIR (or resume=never "
              "to start over in this one)"
        )


def set_aside_previous(out: Path) -> Path | None:
    """``resume=never`` in a folder that holds an earlier run: move its checkpoints, EMA snapshots, final
    export and validation files into ``out/previous-<time>/`` (nothing is deleted), so the new run's
    checkpoints are never mixed with, or pruned in favour of, the old run's. Returns the folder, if any."""
    import time

    names = [n for n in ("checkpoints", "ema_snapshots", "final", "validation") if (out / n).exists()]
    if not names:
        return None
    aside = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=False)
    for name in names:
        os.replace(out / name, aside / name)
    print(f"resume=never: the earlier run's {', '.join(names)} moved to {aside}", flush=True)
    return aside


def clean_incomplete(root: Path, keep: int) -> None:
    """Rank 0, after a marker: drop folders without a marker and all but the newest ``keep`` complete ones."""
    complete = complete_checkpoints(root)
    kept = {f.folder for f in complete[-keep:]}
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name.startswith(PREFIX) and folder.is_dir() and folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)
