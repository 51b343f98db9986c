"""Post-hoc EMA of the trained parameters (Karras et al. 2024, "Analyzing and improving the training
dynamics of diffusion models", §3) on top of ``ema_pytorch.PostHocEMA``, made crash-safe.

Two power-function EMAs (``sigma_rels`` 0.05 and 0.1) are updated after every optimizer step and
snapshotted every ``snapshot_every`` steps; at export any other ``sigma_rel`` is synthesised from the
snapshots by least squares (the paper's Algorithm 3, the library's ``solve_weights``).

The official settings, as found in MMAudio's training config (``config/base_config.yaml``, section
``ema``; seen in a public fork, edo-lucio/MMAudio): ``enable: True``, ``sigma_rels: [0.05, 0.1]``,
``update_every: 1``, ``checkpoint_every: 5_000``, ``default_output_sigma: 0.05``; its ``train.py``
synthesises ``default_output_sigma`` at the end with ``step=None``. MMAudio imports ``PostHocEMA`` from
``nitrous_ema`` (its author's fork of ema-pytorch), not from ema-pytorch itself. We snapshot every
1000 steps by default (more points for the least-squares fit on shorter runs).

What ema-pytorch 0.8.3 does, and what this wrapper changes (read from its ``post_hoc_ema.py``):

- ``PostHocEMA(model, ...)`` builds one ``KarrasEMA`` per sigma_rel, each a ``deepcopy`` of ``model``:
  every floating parameter *and buffer* is averaged, trained or frozen, so tracking the whole
  TextSynch would keep two copies of its frozen ViT backbone. Only trained parameters matter, so we
  hand it a small holder module of the trained parameters alone (frozen ones keep their value).
- ``KarrasEMA.update()`` counts calls in its ``step`` buffer; on call ``k`` (1-based) with
  ``(k - 1) % update_every == 0`` it sets ``ema = lerp(ema, p, 1 - beta)`` with
  ``beta = (1 - 1/(k+1))^(gamma+1)``, after copying ``p`` on the first update: the paper's
  ``(1 - 1/t)^(gamma+1)`` one step later, as if the weights before step 1 equalled those after it
  (negligible after a few hundred steps). ``gamma`` comes from ``sigma_rel`` (paper's Algorithm 2). With
  ``update_every > 1`` beta still uses the call count. The library has no notion of the trainer's
  step: ``update(step)`` here checks the two agree. The update is plain in-place lerp: deterministic.
- The EMA copies have the model's dtype and ``lerp_`` refuses mixed dtypes: a bf16 module would
  average in bf16, where ``(1 - beta) * delta`` rounds away. Non-float32 parameters are therefore
  mirrored into float32 copies before each update.
- ``checkpoint()`` writes ``{index}.{step}.pt`` (index into ``sigma_rels``, step = update calls) per
  EMA with plain ``torch.save`` (not atomic) in ``checkpoint_dtype`` (float16 by default, which would
  cost precision: we use float32). ``synthesize_ema_model`` globs ``*.pt`` in the folder: every file
  there counts, whatever run left it, in filesystem order; without any file it fails with
  ``ValueError: max() arg is an empty sequence``; it synthesises at the last snapshot's step, ignoring
  the updates since. We write the snapshots ourselves (same names and content, temp name + rename),
  keep the list of files in the checkpoint, drop files a killed run left past the resumed step, and
  synthesise deterministically (files in step order) at the current step, the live EMAs included.
- The tracker must be created after the module is on its device (the copies are made on the spot),
  on one rank only (the snapshot folder is shared; ZeRO 1/2 keeps full identical weights everywhere).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ema_pytorch import PostHocEMA
from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma, solve_weights
from torch import nn

STATE_FORMAT = "selva-posthoc-ema/1"
_SNAPSHOT = re.compile(r"^(\d+)\.(\d+)\.pt$")  # the library's "{index}.{step}.pt"


@dataclass(frozen=True)
class EMAConfig:
    """Post-hoc EMA settings; ``sigma_rels`` are relative widths of the averaging profile (0 < s < 0.28)."""

    sigma_rels: tuple[float, ...] = (0.05, 0.1)
    update_every: int = 1  # optimizer steps between EMA updates
    snapshot_every: int = 1000  # optimizer steps between snapshots (MMAudio: 5000)
    export_sigma_rel: float = 0.05  # synthesised for the final export (MMAudio's default_output_sigma)
    enabled: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma_rels", tuple(float(s) for s in self.sigma_rels))  # YAML gives lists
        if len(self.sigma_rels) < 2 or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"ema.sigma_rels needs at least two distinct values, got {self.sigma_rels}")
        # gamma > 0 needs sigma_rel < sqrt(1/12) = 0.2887 (the paper's power-function profiles)
        for s in (*self.sigma_rels, self.export_sigma_rel):
            if not 0 < s < 0.28:
                raise ValueError(f"ema sigma_rel {s} is outside (0, 0.28)")
        if self.update_every < 1 or self.snapshot_every < 1:
            raise ValueError("ema.update_every and ema.snapshot_every must be >= 1")


class _TrainedParameters(nn.Module):
    """The trained parameters of a module, under names with '.' replaced by '/' (module names cannot hold
    dots). float32 parameters are shared with the module; others are mirrored into float32 copies. It
    holds nothing else, so the library's ``deepcopy`` copies only these."""

    def __init__(self, params: Mapping[str, nn.Parameter]):
        super().__init__()
        for name, p in params.items():
            held = p if p.dtype == torch.float32 else nn.Parameter(p.detach().float(), requires_grad=False)
            self.register_parameter(name.replace(".", "/"), held)


class PostHocEMATracker:
    """Post-hoc EMA of one module's trained parameters, with snapshots in ``snapshots_dir``.

    ``param_names`` defaults to the parameters with ``requires_grad`` (call ``selva.stages.set_trainable``
    first). Call :meth:`update` once per optimizer step with the step just completed (1, 2, ...).
    """

    def __init__(
        self,
        module: nn.Module,
        cfg: EMAConfig,
        snapshots_dir: str | os.PathLike,
        *,
        param_names: Sequence[str] | None = None,
    ):
        names = list(param_names) if param_names is not None else [
            n for n, p in module.named_parameters() if p.requires_grad
        ]
        if not names:
            raise ValueError(f"{type(module).__name__} has no trained parameters to average; set requires_grad first")
        self.cfg = cfg
        self.dir = Path(snapshots_dir)
        params = dict(module.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"{type(module).__name__} has no parameters {unknown[:5]}")
        self._names = names
        self._live = [params[n] for n in names]
        self._held = _TrainedParameters({n: params[n] for n in names})
        self._ema = PostHocEMA(
            self._held,
            sigma_rels=cfg.sigma_rels,
            update_every=cfg.update_every,
            checkpoint_every_num_steps="manual",  # we write the snapshots (atomically) in update()
            checkpoint_folder=str(self.dir),
            checkpoint_dtype=torch.float32,
        )
        self._snapshots: list[str] = []  # files of this run, in the order written
        self._resumed = False

    @property
    def param_names(self) -> list[str]:
        return list(self._names)

    @property
    def step(self) -> int:
        """The optimizer steps seen (= the library's update-call count)."""
        return int(self._ema.step.item())

    @property
    def snapshots(self) -> list[str]:
        return list(self._snapshots)

    # -- training --------------------------------------------------------------------------------
    def update(self, step: int) -> None:
        """Update every EMA after optimizer step ``step``; writes a snapshot when ``step % snapshot_every == 0``.

        Raises ``ValueError`` if ``step`` is not the next step, and ``FileExistsError`` when a fresh
        tracker finds snapshots in its folder (another run's: resume with :meth:`load_state_dict`)."""
        if step != self.step + 1:
            raise ValueError(f"EMA update for step {step}, but the tracker has seen {self.step} steps; "
                             "call update once per optimizer step, in order")
        if self.step == 0 and not self._resumed:
            found = sorted(_snapshot_files(self.dir))
            if found:
                raise FileExistsError(f"{self.dir} already holds EMA snapshots ({', '.join(found[:3])}, ...) "
                                      "of another run; resume from a checkpoint or use an empty folder")
        with torch.no_grad():  # float32 mirrors of non-float32 parameters follow the module
            for held, live in zip(self._held.parameters(), self._live, strict=True):
                if held is not live:
                    held.copy_(live)
        self._ema.update()
        if step % self.cfg.snapshot_every == 0:
            self._write_snapshot()

    def _write_snapshot(self) -> None:
        for index, ema in enumerate(self._ema.ema_models):
            name = f"{index}.{self.step}.pt"
            # the library's checkpoint() content (KarrasEMA.state_dict), but float32 and atomic
            pkg = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                   for k, v in ema.state_dict().items()}
            _atomic_torch_save(pkg, self.dir / name)
            self._snapshots.append(name)

    def current_weights(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """The live EMA of one tracked ``sigma_rel``: trained-parameter name -> float32 tensor (CPU copy)."""
        index = self.cfg.sigma_rels.index(sigma_rel)
        return self._unmangle(self._ema.ema_models[index].state_dict(), clone=True)

    # -- checkpoint and resume -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs; loadable with ``torch.load(weights_only=True)``."""
        return {
            "format": STATE_FORMAT,
            "sigma_rels": list(self.cfg.sigma_rels),
            "update_every": self.cfg.update_every,
            "snapshot_every": self.cfg.snapshot_every,
            "param_names": self.param_names,
            "step": self.step,
            "snapshots": list(self._snapshots),
            "ema": {k: v.detach().cpu().clone() for k, v in self._ema.state_dict().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` and make the snapshot folder what it was at that step.

        Snapshots past the saved step (left by a killed run) are deleted. Raises ``ValueError`` when the
        settings or parameter names differ, ``FileNotFoundError`` when a recorded snapshot is gone, and
        ``FileExistsError`` when the folder holds snapshots up to that step that the checkpoint does not list."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a post-hoc EMA state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        saved = (tuple(float(s) for s in state["sigma_rels"]), state["update_every"], state["snapshot_every"])
        mine = (self.cfg.sigma_rels, self.cfg.update_every, self.cfg.snapshot_every)
        if saved != mine:
            raise ValueError(f"EMA checkpoint has (sigma_rels, update_every, snapshot_every) = {saved}, "
                             f"this run {mine}")
        if list(state["param_names"]) != self.param_names:
            diff = sorted(set(state["param_names"]) ^ set(self.param_names))[:5]
            raise ValueError(f"EMA checkpoint tracks other parameters than this run (differences: {diff})")
        self._ema.load_state_dict(dict(state["ema"]))
        saved_step, recorded = int(state["step"]), list(state["snapshots"])
        for name, (_, step) in _snapshot_files(self.dir).items():
            if step > saved_step:
                (self.dir / name).unlink()  # written after the checkpoint by a run that was killed
            elif name not in recorded:
                raise FileExistsError(f"{self.dir / name} is not among the snapshots of the checkpoint at step "
                                      f"{saved_step}: the folder mixes runs")
        for leftover in self.dir.glob("*.pt.tmp"):
            leftover.unlink()
        missing = [n for n in recorded if not (self.dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"EMA snapshots recorded at step {saved_step} are missing from {self.dir}: "
                                    + ", ".join(missing[:5]))
        self._snapshots, self._resumed = recorded, True

    # -- synthesis -------------------------------------------------------------------------------
    @torch.no_grad()
    def synthesize(self, sigma_rel: float | None = None) -> dict[str, torch.Tensor]:
        """EMA weights for ``sigma_rel`` (default ``export_sigma_rel``) at the current step.

        Returns trained-parameter name (the module's own key) -> CPU tensor of the parameter's shape,
        float32. Combines the snapshots (in step order) and, when the current step is not a snapshot
        step, the live EMAs; before any update it returns the parameters as they are."""
        sigma_rel = self.cfg.export_sigma_rel if sigma_rel is None else sigma_rel
        if self.step == 0:
            return {n: p.detach().float().cpu().clone() for n, p in zip(self._names, self._live, strict=True)}
        points: list[tuple[int, int, dict[str, torch.Tensor] | Path]] = []  # (step, index, source)
        for name in self._snapshots:
            index, step = map(int, _SNAPSHOT.match(name).groups())
            points.append((step, index, self.dir / name))
        if not any(step == self.step for step, _, _ in points):
            points += [(self.step, i, ema.state_dict()) for i, ema in enumerate(self._ema.ema_models)]
        points.sort(key=lambda point: (point[0], point[1]))
        gammas = torch.tensor([self._ema.gammas[i] for _, i, _ in points], dtype=torch.float64)
        steps = torch.tensor([s for s, _, _ in points], dtype=torch.float64)
        target_gamma = torch.tensor([sigma_rel_to_gamma(sigma_rel)], dtype=torch.float64)
        weights = solve_weights(steps, gammas, torch.tensor([float(self.step)], dtype=torch.float64), target_gamma)
        total: dict[str, torch.Tensor] = {}
        for (_, _, source), weight in zip(points, weights.squeeze(-1).tolist(), strict=True):
            state = source if isinstance(source, dict) else torch.load(source, map_location="cpu", weights_only=True)
            for name, tensor in self._unmangle(state, clone=False).items():
                term = tensor.double() * weight  # float64 sums: the least-squares weights have mixed signs
                total[name] = term if name not in total else total[name].add_(term)
        return {name: total[name].float() for name in self.param_names}

    def _unmangle(self, ema_state: Mapping[str, torch.Tensor], *, clone: bool) -> dict[str, torch.Tensor]:
        """KarrasEMA state (``ema_model.<a/b/c>``, ``step``, ``initted``) -> the module's names (``a.b.c``)."""
        prefix = "ema_model."
        out = {}
        for key, value in ema_state.items():
            if key.startswith(prefix):
                value = value.detach().cpu()
                out[key[len(prefix):].replace("/", ".")] = value.float().clone() if clone else value
        return out


def _snapshot_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Snapshot file name -> (index, step) for the library-named files in ``folder``."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _SNAPSHOT.match(path.name)
        if match:
            found[path.name] = (int(match.group(1)), int(match.group(2)))
    return found


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``<name>.tmp`` (which the library's ``*.pt`` glob skips), fsync, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
