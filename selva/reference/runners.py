"""The contract between the reference checker and our modules.

The checker (:mod:`selva.reference.check`) reads a directory's ``cases.json``, builds the inputs and
the rule weights, and for every case and every ``run`` dtype calls the runner registered for the
case's ``(component, call)``. A runner builds our module, loads the rule weights through the same
strict loader that loads released checkpoints, makes the call, and returns every value it can
produce by its ``cases.json`` name (``"velocity"``, ``"cond.clip_f"``, ``"joint_blocks.0.latent"``...).

Runners live next to the components they exercise (``model_runners`` for the video encoder,
generator, sampler and sequence lengths; ``audio_runners`` for mel, VAE and vocoder) and register
themselves with :func:`register`. A component with no registered runner is reported by the checker
as "not implemented", which fails the check.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Modules that register runners on import. A missing module (a component not built yet) is skipped.
RUNNER_MODULES = ("selva.reference.model_runners", "selva.reference.audio_runners")


@dataclass
class CaseContext:
    """Everything a runner needs for one case in one run dtype."""

    case: dict[str, Any]
    """The raw case entry of ``cases.json`` (id, component, model, call, params, outputs...)."""
    dtype: torch.dtype | None
    """``torch.float32`` or ``torch.float64``; ``None`` for cases with integer outputs only."""
    inputs: dict[str, torch.Tensor]
    """Resolved inputs by role. Formula inputs are the float32 values cast to ``dtype``; masks are
    bool; ``t`` is a (B,) tensor of ``dtype``; ``{"file", "key"}`` inputs keep their stored dtype."""
    params: dict[str, Any]
    wanted: set[str]
    """The value names this run must produce (a runner may return more)."""
    rule_state_dict: Callable[[str], dict[str, torch.Tensor]]
    """``rule_state_dict(model)`` -> float32 rule tensors for every *parameter* of the manifest
    ``<model>.keys.json`` (salted by the directory's weight salt). Buffers are not included."""
    directory: str = ""
    """The reference directory (for files a runner reads itself, e.g. official buffers)."""
    extra: dict[str, Any] = field(default_factory=dict)


Runner = Callable[[CaseContext], dict[str, Any]]

_RUNNERS: dict[tuple[str, str], Runner] = {}


def register(component: str, call: str) -> Callable[[Runner], Runner]:
    def wrap(fn: Runner) -> Runner:
        _RUNNERS[(component, call)] = fn
        return fn

    return wrap


def get_runner(component: str, call: str) -> Runner | None:
    for module in RUNNER_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real import error inside an existing module: surface it
                raise
    return _RUNNERS.get((component, call))


def implemented() -> list[tuple[str, str]]:
    get_runner("", "")
    return sorted(_RUNNERS)
