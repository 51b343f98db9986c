"""Read a VGG-MonoAudio-style benchmark: the one ``selva benchmark build`` writes, or the released one.

Layout (both): ``ROOT/<subset>/metadata.csv`` for each subset folder (``intra_class``,
``inter_class``; any other folder with a ``metadata.csv`` is read too), composites under
``<subset>/`` as ``file_name`` says, references in ``<subset>/target_audio/``.

Columns, and what is unknown when a column is missing:

* ``file_name`` (required): the composite, relative to the subset folder; a bare name is also
  looked for in ``<subset>/mixed/``. The item's ``name`` is its stem.
* ``label`` (required): the prompt, the target's label.
* ``negative``, else ``paired_label`` (the column the official batch inference reads): the
  partner's label, the negative prompt. None when neither column exists.
* ``placement``, else ``target_position``: ``left``/``right``, where the target is. Without either,
  it is read from a ``_left``/``_right`` ending of the name (the release names composites
  ``<target>_<partner>_<side>``), else None.
* ``target``/``partner``, else ``target_file``/``paired_file``: the clip ids (file extension
  dropped); else, for VGGSound-style names (``<11-char id>_<6-digit start>`` twice), parsed from
  the name; else None.
* the reference: ``target_audio/<name>.flac`` or ``.wav``; else ``target_audio/<target id>.flac``
  or ``.wav``; else None (the released set's naming of its references is not documented: check
  ``target_audio`` before trusting a None).

A composite named in a metadata file but missing on disk, a duplicate name within a subset, or a
placement other than left/right is an error that names the file and line: evaluation must never
skip an item silently.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from training.benchmark_plan import PLACEMENTS, SUBSETS

AUDIO_SUFFIXES = (".flac", ".wav")
VGGSOUND_PAIR = re.compile(r"^([A-Za-z0-9_-]{11}_\d{6})_([A-Za-z0-9_-]{11}_\d{6})_(left|right)$")


class BenchmarkError(ValueError):
    """A benchmark folder or its metadata cannot be read; the message names the file."""


@dataclass(frozen=True)
class BenchmarkItem:
    subset: str  # "intra_class", "inter_class", or another subset folder's name
    name: str  # the composite's file stem: generated audio is matched to references by it
    video: Path | None  # the composite mp4 (two clips side by side); None only with require_videos=False
    target_audio: Path | None  # reference: 16 kHz mono, the target clip's sound; None where not found
    label: str  # the prompt (the target's label)
    negative: str | None  # the partner's label (negative prompt); None where the metadata has none
    placement: str | None  # "left" | "right": the target's side; None where unknown
    target: str | None = None  # the target clip's id, where known
    partner: str | None = None  # the partner clip's id, where known


def _first(row: dict[str, str], *columns: str) -> str | None:
    for column in columns:
        value = (row.get(column) or "").strip()
        if value:
            return value
    return None


def _subset_dirs(root: Path) -> list[Path]:
    known = [root / s for s in SUBSETS if (root / s / "metadata.csv").is_file()]
    others = sorted(p for p in root.iterdir() if p.is_dir() and p not in known and (p / "metadata.csv").is_file())
    return known + others


def _find_video(folder: Path, file_name: str) -> Path | None:
    for candidate in (folder / file_name, folder / "mixed" / file_name):
        if candidate.is_file():
            return candidate
    return None


def _find_audio(folder: Path, *stems: str | None) -> Path | None:
    for stem in stems:
        if not stem:
            continue
        for suffix in AUDIO_SUFFIXES:
            candidate = folder / "target_audio" / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_subset(folder: Path, require_videos: bool, problems: list[str]) -> list[BenchmarkItem]:
    """The items of one subset; every bad row is appended to ``problems`` (and left out)."""
    metadata = folder / "metadata.csv"
    with metadata.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("file_name", "label") if c not in columns]
        if missing:
            problems.append(f"{metadata}: no column {', '.join(missing)} (columns: {', '.join(columns)})")
            return []
        items: list[BenchmarkItem] = []
        seen: dict[str, int] = {}
        for row in reader:
            line = reader.line_num
            where = f"{metadata}: line {line}"
            row = {(k or "").strip(): v for k, v in row.items()}
            file_name, label = _first(row, "file_name"), _first(row, "label")
            if file_name is None or label is None:
                problems.append(f"{where}: empty file_name or label")
                continue
            name = Path(file_name).stem
            if name in seen:
                problems.append(f"{where}: {name!r} is listed again (first on line {seen[name]})")
                continue
            seen[name] = line
            video = _find_video(folder, file_name)
            if video is None and require_videos:
                problems.append(f"{where}: no file {folder / file_name} (nor in mixed/)")
                continue
            parsed = VGGSOUND_PAIR.match(name)
            placement = _first(row, "placement", "target_position")
            if placement is None and name.rsplit("_", 1)[-1] in PLACEMENTS:
                placement = name.rsplit("_", 1)[-1]
            if placement is not None:
                placement = placement.lower()
                if placement not in PLACEMENTS:
                    problems.append(f"{where}: placement {placement!r} is not left or right")
                    continue
            target = _first(row, "target", "target_file") or (parsed.group(1) if parsed else None)
            partner = _first(row, "partner", "paired_file") or (parsed.group(2) if parsed else None)
            target = Path(target).stem if target else None
            partner = Path(partner).stem if partner else None
            items.append(
                BenchmarkItem(
                    subset=folder.name, name=name, video=video, target_audio=_find_audio(folder, name, target),
                    label=label, negative=_first(row, "negative", "paired_label"), placement=placement,
                    target=target, partner=partner,
                )
            )  # fmt: skip
    return items


def read_benchmark(root: str | Path, require_videos: bool = True) -> list[BenchmarkItem]:
    """Every item of the benchmark at ``root``, subset by subset (intra_class, inter_class, then any
    other subset folder), each in its metadata's order.

    ``require_videos=False`` (evaluation, which needs only the references) accepts rows whose
    composite is not on disk; their ``video`` is None. Raises one BenchmarkError listing every bad
    row of every subset (first line: how many), never only the first.
    """
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"{root}: no such folder (expected a benchmark with intra_class/ and inter_class/)")
    folders = _subset_dirs(root)
    if not folders:
        raise BenchmarkError(f"{root}: no <subset>/metadata.csv (expected intra_class/ and inter_class/)")
    problems: list[str] = []
    items = [item for folder in folders for item in _read_subset(folder, require_videos, problems)]
    if problems:
        if len(problems) == 1:
            raise BenchmarkError(problems[0])
        raise BenchmarkError("\n".join([f"{root}: {len(problems)} bad metadata rows:", *(f"  {p}" for p in problems)]))
    return items
