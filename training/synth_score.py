"""Scores of the synthetic proof: does the generated sound follow the *prompted* object's events?

For every composite of the synthetic test set (``pipelines.synth_world``: two held-out clips of
different kinds side by side, each composite asked for each of its objects), with the event times and
pitches of the clip table:

* **sync**: onset F1 (±80 ms) of the generated track against the prompted object's events
  (``training.onsets``);
* **distractor sync**: the same detections against the *other* object's events. Events are drawn
  independently per clip, so a track that follows the prompted object still meets some of the other's
  events by chance: that chance level is *measured*, as the distractor sync of the ground truth (the
  prompted clip's own track scored against the other clip's events);
* **temporal selectivity** = sync - distractor sync;
* **pitch selectivity**: the share of tracks whose dominant tone is the prompted kind's. The prompt
  alone decides it (the generator reads the text), so it is a sanity check, not evidence of selection.

Every value is a mean over the composites; ``per_item`` keeps each one.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from preprocessing.compact import decode_flac
from training.benchmark_read import BenchmarkItem, read_benchmark
from training.onsets import dominant_kind, onset_f1

TOLERANCE_S = 0.08  # two video frames at 25 fps: the onset tolerance


@dataclass(frozen=True)
class WorldClipInfo:
    id: str
    kind: int
    pitch_hz: float
    onsets: tuple[float, ...]  # s


@dataclass(frozen=True)
class ItemScore:
    name: str
    placement: str
    sync: float
    distractor: float
    pitch_ok: bool


def read_world_table(path: str | Path) -> dict[str, WorldClipInfo]:
    """The synth clip table (``pipelines.synth_world.TABLE_COLUMNS``) -> {id: clip info}."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    missing = {"id", "kind", "pitch_hz", "onsets"} - set(rows[0] if rows else ())
    if missing:
        raise ValueError(f"{path}: not a synth clip table (no column {', '.join(sorted(missing))})")
    return {r["id"]: WorldClipInfo(r["id"], int(r["kind"]), float(r["pitch_hz"]),
                                   tuple(float(t) for t in r["onsets"].split(",") if t))
            for r in rows}  # fmt: skip


def score_track(audio: np.ndarray, rate: int, target: WorldClipInfo, partner: WorldClipInfo,
                pitches: list[float]) -> tuple[float, float, bool]:
    """(sync, distractor sync, dominant tone is the target's) of one track."""
    sync = onset_f1(audio, rate, target.onsets, TOLERANCE_S)
    distractor = onset_f1(audio, rate, partner.onsets, TOLERANCE_S)
    return sync, distractor, pitches[dominant_kind(audio, rate, pitches)] == target.pitch_hz


def summarise(scores: list[ItemScore]) -> dict:
    sync = float(np.mean([s.sync for s in scores]))
    distractor = float(np.mean([s.distractor for s in scores]))
    pitch = float(np.mean([s.pitch_ok for s in scores]))
    return {"items": len(scores), "sync": sync, "distractor_sync": distractor,
            "temporal_selectivity": sync - distractor, "pitch_selectivity": pitch}


Scored = tuple[BenchmarkItem, WorldClipInfo, WorldClipInfo]


def _items(benchmark: Path, clips: dict[str, WorldClipInfo]) -> list[Scored]:
    out = []
    for item in read_benchmark(benchmark, require_videos=False):
        if item.target not in clips or item.partner not in clips:
            raise ValueError(f"{benchmark}: {item.subset}/{item.name}: clip {item.target} or {item.partner} "
                             "is not in the clip table")
        out.append((item, clips[item.target], clips[item.partner]))
    return out


def score_folder(generated: str | Path, benchmark: str | Path, table: str | Path) -> dict:
    """Score ``generated/<subset>/<name>.flac`` for every composite of ``benchmark`` (read with
    ``read_benchmark``); a missing file is an error that names it. Returns ``summarise`` plus
    ``per_item``."""
    clips = read_world_table(table)
    pitches = sorted({c.pitch_hz for c in clips.values()})
    scores, missing = [], []
    for item, target, partner in _items(Path(benchmark), clips):
        path = Path(generated) / item.subset / f"{item.name}.flac"
        if not path.is_file():
            missing.append(str(path))
            continue
        audio, rate = decode_flac(path.read_bytes())
        scores.append(ItemScore(item.name, item.placement or "", *score_track(audio, rate, target, partner, pitches)))
    if missing:
        raise ValueError(f"{len(missing)} generated track(s) missing: " + ", ".join(missing[:5])
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return {**summarise(scores), "per_item": [asdict(s) for s in scores]}


def score_ground_truth(benchmark: str | Path, table: str | Path, shift_s: float = 0.0) -> dict:
    """The scores of the references themselves (each composite's target track), optionally delayed by
    ``shift_s`` seconds (zeros in front): sync ~1 unshifted, distractor sync = the chance level, and a
    low sync once shifted past the tolerance."""
    clips = read_world_table(table)
    pitches = sorted({c.pitch_hz for c in clips.values()})
    scores = []
    for item, target, partner in _items(Path(benchmark), clips):
        if item.target_audio is None:
            raise ValueError(f"{benchmark}: {item.subset}/{item.name} has no reference track")
        audio, rate = decode_flac(item.target_audio.read_bytes())
        if shift_s:
            audio = np.concatenate([np.zeros(round(shift_s * rate), audio.dtype), audio])[: len(audio)]
        scores.append(ItemScore(item.name, item.placement or "", *score_track(audio, rate, target, partner, pitches)))
    return summarise(scores)
