"""The trainer's configuration: typed dataclasses read from YAML, with dotted ``key=value`` overrides.

``selva train --config configs/train/tiny.yaml steps=200 optim.lr=3e-4 init.generator=PATH`` and
``torchrun -m training.train --config ... key=value`` resolve the same way:

1. the dataclass defaults (MMAudio's published recipe, see :class:`OptimConfig`);
2. the YAML file (nested mappings mirror the dataclasses);
3. the overrides, in order. The short names the issue promises work at any nesting: ``dataset=DIR``
   (one dataset, weight 1), ``out``, ``stage``, ``steps``, ``seed``, ``checkpoint_every``,
   ``tracking_uri``, ``resume`` are top-level fields; everything else is a dotted path.

Every key is checked against the dataclasses and every value against its field's type *before* any
process group starts: an unknown key or a wrong type fails naming the key, the value and the source
(file or override). Secrets never reach a log: :func:`redact` hides credentials in URIs (the MLflow
tracking URI may carry ``user:password@``), and every place that prints or logs the config uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from preprocessing.redact import redact


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key and its source."""


# --------------------------------------------------------------------------------------------- schema
@dataclass
class DatasetEntry:
    """One dataset folder (``selva precompute``'s output) and its sampling weight.

    Several entries are mixed per batch in proportion to ``weight`` (MMAudio oversamples VGGSound ×5
    against its audio-text sets the same way)."""

    path: str = ""
    weight: float = 1.0


@dataclass
class OptimConfig:
    """AdamW and its schedule; the defaults are MMAudio's published recipe (config/base_config.yaml)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 1e-6
    warmup_steps: int = 1000  # linear warm-up from 0
    lr_milestones: tuple[float, ...] = (0.8, 0.9)  # fractions of ``steps`` where the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    grad_clip: float = 1.0  # global grad-norm clip (0: off)


@dataclass
class MixingConfig:
    """Online self-augmentation (DESIGN §5); ``enabled: false`` is the no-mixing ablation.

    ``enabled`` unset resolves to on for stages ``encoder``/``generator`` and off for ``pretrain``
    (single-source clips, as Synchformer and MMAudio pre-train); the resolved config shows the value."""

    enabled: bool | None = None
    prob: float = 0.5
    alpha: float = 1.0
    constant_lambda: float | None = None
    min_lambda: float = 0.05


@dataclass
class LoaderSettings:
    batch_size: int = 8  # per rank and micro-step
    num_workers: int = 2
    shuffle_buffer: int = 256
    prefetch_factor: int = 2


@dataclass
class InitConfig:
    """Initial weights per module: one of our exports (``final/`` or a ``.safetensors``), an official
    ``.pth``, or an official weights folder. Empty: the preset's fresh initialisation."""

    textsynch: str = ""
    generator: str = ""
    backbone: str = ""  # Synchformer's state dict, for TextSynch's MotionFormer


@dataclass
class EMASettings:
    """Post-hoc EMA (Karras et al. 2024) as in the official config: σ_rel 0.05 and 0.1, 0.05 exported."""

    enabled: bool = True
    sigma_rels: tuple[float, ...] = (0.05, 0.1)
    update_every: int = 1
    snapshot_every: int = 1000
    export_sigma_rel: float = 0.05


@dataclass
class ValidationConfig:
    every: int = 0  # steps between validations (0: only at the end)
    batches: int = 4  # val batches of the loss
    audio_clips: int = 2  # fixed val clips generated as flac + spectrogram
    sampling_steps: int = 25
    cfg_strength: float = 4.5


@dataclass
class TrainConfig:
    """Everything one training job needs; ``stage`` picks the parameter set (DESIGN §4).

    Stages: ``pretrain`` (backbone + generator on plain clips, text not in the video encoder: stands in
    for Synchformer and MMAudio pre-training where no official weights are used), ``encoder`` (stage 1:
    TextSynch's new parameters through the frozen generator), ``generator`` (stage 2).
    """

    dataset: list[DatasetEntry] = field(default_factory=list)
    val_dataset: str = ""  # defaults to the first dataset's val split
    out: str = ""
    preset: str = "tiny"
    stage: str = "pretrain"
    steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto: newest complete checkpoint under out/checkpoints; never: start fresh; or a path
    tracking_uri: str = ""  # empty: sqlite file in out/
    experiment: str = "selva-train"
    run_name: str = ""
    grad_accum: int = 1
    zero_stage: int = 2  # ZeRO 1 (optimizer state sharded) or 2 (also gradients)
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or bf16 / fp32
    cfg_dropout: float = 0.1  # video conditions (clip + sync) together, text separately
    text_in_encoder: bool = True  # false: the "no text in the video encoder" ablation (MMAudio-style)
    # stage pretrain only: train the video backbone with the generator (a Synchformer stand-in), or keep it
    # at its initialisation. configs/train/tiny.yaml keeps the random-init embedded backbone: trained jointly
    # from scratch it changes under the generator faster than the generator learns to read it (docs/training.md)
    pretrain_backbone: bool = True
    max_bad_steps: int = 10  # consecutive skipped (non-finite) steps that stop the run
    collective_timeout_s: float = 600.0  # a hung rank ends the job after this long
    log_every: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    init: InitConfig = field(default_factory=InitConfig)
    ema: EMASettings = field(default_factory=EMASettings)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


STAGES = ("pretrain", "encoder", "generator")
PRECISIONS = ("auto", "bf16", "fp32")


# ------------------------------------------------------------------------------------ type checking
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` as type ``tp`` (str/int/float/bool, tuples, lists of dataclasses, optionals), or ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{key}: {value!r} is not of type {_describe(tp)} ({source})")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key + ".", source)
    if origin in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise bad
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: needs {len(args)} values, got {len(value)} ({source})")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()) and float(value).is_integer():
            return int(float(value))  # "steps: 1e3" in a file: YAML 1.1 reads it as a string; "12" stays refused
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-4 as a string
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a schema bug, not a user error


def _build(cls: type, values: dict[str, Any], prefix: str, source: str, base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} ({source}); known keys under {prefix or 'the top level'}: "
            f"{', '.join(sorted(names))}"
        )
    obj = base if base is not None else cls()
    for name, value in values.items():
        current = getattr(obj, name)
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            setattr(obj, name, _build(tp, value, f"{prefix}{name}.", source, current))
        elif name == "dataset" and cls is TrainConfig:
            setattr(obj, name, _datasets(value, source))
        else:
            setattr(obj, name, _coerce(value, tp, prefix + name, source))
    return obj


def _datasets(value: Any, source: str) -> list[DatasetEntry]:
    """``dataset``: a path, a list of paths, or a list of ``{path, weight}`` mappings."""
    if isinstance(value, dict):  # dataset.weight=2 would silently replace the whole list
        raise ConfigError(f"dataset: give a path (dataset=DIR) or, in the config file, a list of paths or "
                          f"{{path, weight}} entries; {value!r} is neither ({source})")
    if value in ("", None, []):
        raise ConfigError(f"dataset: empty ({source}); give dataset=DIR")
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item.strip():
            out.append(DatasetEntry(path=item))
        elif isinstance(item, dict):
            out.append(_build(DatasetEntry, item, f"dataset[{i}].", source))
        else:
            raise ConfigError(f"dataset[{i}]: {item!r} is neither a path nor a {{path, weight}} mapping ({source})")
    return out


# ------------------------------------------------------------------------------------ loading
def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML, so 3e-4, true, [1, 2] and null keep their types)."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise ConfigError(f"override {text!r} is not key=value (e.g. steps=100 or optim.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, float | int) and not isinstance(value, bool) and re.fullmatch(r"\d+e\d+", raw.strip()):
        value = float(raw)  # YAML 1.1 reads 1e5 as a string; as a number it is meant
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", raw.strip()):
        value = float(raw)
    return key.strip(), value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] = (),  # type: ignore[assignment]
                *, need_paths: bool = True) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (optional), then ``overrides`` in order; validated.
    ``need_paths`` False lets ``dataset`` and ``out`` stay unset (``--print-config`` of a file alone)."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        cfg = _build(TrainConfig, data, "", str(path), cfg)
    for text in overrides:
        key, value = parse_override(text)
        cfg = _build(TrainConfig, _nest(key, value), "", f"override {text!r}", cfg)
    if cfg.mixing.enabled is None:
        cfg.mixing.enabled = cfg.stage != "pretrain"
    validate(cfg, need_paths=need_paths)
    return cfg


def validate(cfg: TrainConfig, *, need_paths: bool = True) -> None:
    """Value checks that types cannot express; each error names the key."""
    checks = [
        (cfg.stage in STAGES, f"stage: {cfg.stage!r} is not one of {', '.join(STAGES)}"),
        (cfg.precision in PRECISIONS, f"precision: {cfg.precision!r} is not one of {', '.join(PRECISIONS)}"),
        (cfg.steps >= 1, f"steps: must be >= 1, got {cfg.steps}"),
        (cfg.checkpoint_every >= 1, f"checkpoint_every: must be >= 1, got {cfg.checkpoint_every}"),
        (cfg.keep_checkpoints >= 1, f"keep_checkpoints: must be >= 1, got {cfg.keep_checkpoints}"),
        (cfg.grad_accum >= 1, f"grad_accum: must be >= 1, got {cfg.grad_accum}"),
        # 1 or 2: their optimizer skips a non-finite step on every rank (training/engine.py); stage 3 would
        # also shard the weights, for no gain at these model sizes
        (cfg.zero_stage in (1, 2), f"zero_stage: {cfg.zero_stage} is not 1 or 2"),
        (0.0 <= cfg.cfg_dropout < 1.0, f"cfg_dropout: must be in [0, 1), got {cfg.cfg_dropout}"),
        (cfg.loader.batch_size >= 1, f"loader.batch_size: must be >= 1, got {cfg.loader.batch_size}"),
        (cfg.optim.lr > 0, f"optim.lr: must be > 0, got {cfg.optim.lr}"),
        (all(0 < m < 1 for m in cfg.optim.lr_milestones), "optim.lr_milestones: fractions in (0, 1)"),
        (bool(cfg.dataset) or not need_paths, "dataset: no dataset given (dataset=DIR, or a list in the config file)"),
        (bool(cfg.out) or not need_paths, "out: no output folder given (out=DIR)"),
        (all(d.weight > 0 and math.isfinite(d.weight) for d in cfg.dataset),
         "dataset[].weight: weights must be finite and > 0"),
        # numpy's seeding takes 0 .. 2**32 - 1 per word; torch.manual_seed at most 2**64 - 1
        (0 <= cfg.seed < 2**63, f"seed: must be in [0, 2**63), got {cfg.seed}"),
        (cfg.stage != "encoder" or cfg.text_in_encoder,
         "text_in_encoder: false leaves stage 'encoder' nothing to train (the ablation trains 'generator' "
         "on text-free video features)"),
        (cfg.stage != "encoder" or bool(cfg.init.generator),
         "init.generator: stage 'encoder' trains TextSynch through a frozen generator, which must be a trained "
         "one (our final/ of a pretrain or generator run, or the official weights folder): a fresh generator's "
         "zero-initialised output layer passes no gradient back"),
        (cfg.max_bad_steps >= 1, f"max_bad_steps: must be >= 1, got {cfg.max_bad_steps}"),
        (cfg.log_every >= 1, f"log_every: must be >= 1, got {cfg.log_every}"),
        (cfg.collective_timeout_s > 0, f"collective_timeout_s: must be > 0, got {cfg.collective_timeout_s}"),
        (math.isfinite(cfg.optim.lr), f"optim.lr: must be finite, got {cfg.optim.lr}"),
        (all(0.0 <= b < 1.0 for b in cfg.optim.betas), f"optim.betas: each in [0, 1), got {list(cfg.optim.betas)}"),
        (cfg.optim.eps > 0 and cfg.optim.weight_decay >= 0, "optim.eps must be > 0 and optim.weight_decay >= 0"),
        (cfg.optim.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {cfg.optim.warmup_steps}"),
        (list(cfg.optim.lr_milestones) == sorted(cfg.optim.lr_milestones), "optim.lr_milestones: must be ascending"),
        (0 < cfg.optim.lr_gamma <= 1, f"optim.lr_gamma: must be in (0, 1], got {cfg.optim.lr_gamma}"),
        (cfg.optim.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0: off), got {cfg.optim.grad_clip}"),
        (0.0 <= cfg.mixing.prob <= 1.0, f"mixing.prob: must be in [0, 1], got {cfg.mixing.prob}"),
        (cfg.mixing.alpha > 0, f"mixing.alpha: must be > 0, got {cfg.mixing.alpha}"),
        (0.0 <= cfg.mixing.min_lambda < 0.5, f"mixing.min_lambda: must be in [0, 0.5), got {cfg.mixing.min_lambda}"),
        (cfg.mixing.constant_lambda is None
         or cfg.mixing.min_lambda <= cfg.mixing.constant_lambda <= 1 - cfg.mixing.min_lambda,
         f"mixing.constant_lambda: must be in [min_lambda, 1 - min_lambda] = [{cfg.mixing.min_lambda}, "
         f"{1 - cfg.mixing.min_lambda}], got {cfg.mixing.constant_lambda}"),
        (cfg.loader.num_workers >= 0, f"loader.num_workers: must be >= 0, got {cfg.loader.num_workers}"),
        (cfg.loader.shuffle_buffer >= 0, f"loader.shuffle_buffer: must be >= 0, got {cfg.loader.shuffle_buffer}"),
        (cfg.loader.prefetch_factor >= 1, f"loader.prefetch_factor: must be >= 1, got {cfg.loader.prefetch_factor}"),
        (len(set(cfg.ema.sigma_rels)) == len(cfg.ema.sigma_rels) >= 2,
         f"ema.sigma_rels: at least two distinct values, got {list(cfg.ema.sigma_rels)}"),
        (all(0 < x < 0.28 for x in (*cfg.ema.sigma_rels, cfg.ema.export_sigma_rel)),
         "ema.sigma_rels / ema.export_sigma_rel: each in (0, 0.28) (Karras et al.'s power-function EMA)"),
        (cfg.ema.update_every >= 1 and cfg.ema.snapshot_every >= 1,
         "ema.update_every and ema.snapshot_every: must be >= 1"),
        (cfg.validation.every >= 0 and cfg.validation.batches >= 0 and cfg.validation.audio_clips >= 0
         and cfg.validation.sampling_steps >= 1,
         "validation: every, batches and audio_clips must be >= 0 and sampling_steps >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ------------------------------------------------------------------------------------ output
def to_dict(cfg: TrainConfig, *, redacted: bool = True) -> dict[str, Any]:
    """The resolved config as plain data (tuples as lists), credentials redacted unless asked not to."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, str) and redacted:
            return redact(x)
        return x

    return clean(dataclasses.asdict(cfg))


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys -> strings, for MLflow params (``optim.lr`` -> ``0.0001``, lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | type(None) | bool) else str(value)
    return out


# fields that may change between a checkpoint and its resume without breaking exactness
# (``steps`` is not: the lr milestones are fractions of it; ``loader.num_workers`` is not: each worker
# has its own seeded stream)
RESUME_FREE = ("resume", "tracking_uri", "experiment", "run_name", "checkpoint_every", "keep_checkpoints",
               "log_every", "validation", "collective_timeout_s", "loader.prefetch_factor", "out", "max_bad_steps")


def resume_fingerprint(cfg: TrainConfig) -> dict[str, str]:
    """The flattened config minus :data:`RESUME_FREE` and the datasets' paths (the data itself is
    compared by its fingerprint, so a dataset moved to another mount resumes): what must be equal."""
    flat = flatten(to_dict(cfg, redacted=True))
    where = re.compile(r"dataset\.\d+\.path|val_dataset")
    # a switch that only acts in stage pretrain is no part of what other stages resume
    inert = {"pretrain_backbone"} if cfg.stage != "pretrain" else set()
    return {k: v for k, v in flat.items()
            if not where.fullmatch(k) and k not in inert
            and not any(k == f or k.startswith(f + ".") for f in RESUME_FREE)}


def config_hash(cfg: TrainConfig) -> str:
    blob = json.dumps(resume_fingerprint(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
