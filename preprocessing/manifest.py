"""Manifests: which clips a dataset holds, their stable keys, and which shard each one goes to.

The manifest is fixed before any work starts (DESIGN §6), so a rerun does only the missing shards and
writes the same bytes. It depends on the input table, the clip duration, the seed and the shard size
only -- never on which media files happen to exist on the machine that built it -- so the same input and
seed give a byte-identical ``manifest.parquet`` anywhere.

Rules (docs/shard-format.md has the full list):

* key = first 16 hex digits of sha1(``f"{source_id}|{start:.3f}|{duration:.3f}"``): stable, no dots
  (WebDataset splits member names at the first dot), millisecond resolution;
* every clip has the preset's duration: a longer span is cut from its start, a shorter one rejected;
* rows that cannot become a clip (``bad_row``, ``bad_text``, ``too_short``, ``duplicate``: the rules
  are in ``preprocessing.input_rows``) stay out of the manifest and are recorded with their line in
  the dataset-level failures table; missing media files are reported by ``validate`` and recorded by
  the job at run time, in their shard's failures table;
* ``path`` is stored as given (default ``<id>.mp4``); relative paths resolve against the media root
  recorded in ``dataset.json`` (overridable), so moving the media to a cluster needs no new manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.errors import Rejected, RejectReason
from preprocessing.input_rows import ClipRow, Collisions, ManifestProblem, clip_key, judge_row
from preprocessing.input_table import ManifestError, read_input_table
from preprocessing.shards import atomic_target

DEFAULT_SAMPLES_PER_SHARD = 1000

__all__ = [
    "ManifestError",
    "ManifestProblem",
    "ManifestRow",
    "ClipRow",
    "clip_key",
    "shard_name",
    "read_clips",
    "validate",
    "assign_shards",
    "build_manifest",
    "write_manifest",
    "read_manifest",
    "manifest_hash",
    "rows_by_shard",
    "resolve_media_path",
    "check_row",
]


@dataclass(frozen=True)
class ManifestRow:
    key: str
    source_id: str
    path: str
    start: float
    duration: float
    text: str
    split: str
    shard: str
    index_in_shard: int
    row: int  # the input table's data row, for messages that point a user back at the input
    line: int | None = None  # the row's line in a text table (None for Parquet)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def resolve_media_path(path: str, media_root: str | Path | None) -> str:
    """Where a manifest ``path`` lives: URIs and absolute paths as stored, others under ``media_root``."""
    if "://" in path or os.path.isabs(path) or media_root is None:
        return path
    return os.path.join(os.fspath(media_root), path)


class _FileIndex:
    """Existence checks that list each directory once: one ``listdir`` beats 100k ``stat``s on NFS."""

    def __init__(self) -> None:
        self._dirs: dict[str, set[str] | None] = {}

    def exists(self, path: str) -> bool:
        if "://" in path:
            return True  # object-store URIs are checked by the job that opens them
        parent, name = os.path.split(path)
        if parent not in self._dirs:
            try:
                self._dirs[parent] = {e.name for e in os.scandir(parent or ".") if e.is_file()}
            except OSError:
                self._dirs[parent] = None
        names = self._dirs[parent]
        return names is not None and name in names


def read_clips(
    table_path: str | Path,
    *,
    duration: float,
    media_root: str | Path | None = None,
    default_split: str = "train",
    text_column: str | None = None,
    check_files: bool = True,
) -> tuple[list[ClipRow], list[ManifestProblem]]:
    """Every usable clip of the table (first of each clip, in table order) and every problem found.

    ``duration`` is the preset's clip length: every clip gets it (longer spans are cut from their
    start, shorter ones rejected). ``media_root`` defaults to the table's folder. Problems come sorted
    by row; those with ``rejects`` keep their row out of the clips, ``missing_file`` ones do not.
    """
    table = read_input_table(table_path, text_column=text_column)
    # a URL root stays a string: Path("http://host/media") would collapse the "//"
    root = os.fspath(media_root) if media_root is not None else table.path.parent
    files = _FileIndex()
    collisions = Collisions()
    clips: list[ClipRow] = []
    problems: list[ManifestProblem] = []
    for item in table.rows:
        clip, problem = judge_row(item, table, duration, default_split)
        if clip is not None:
            path = resolve_media_path(clip.path, root)
            # absolute and normalised, so "a.mp4", "./a.mp4" and "/media/a.mp4" are one file (symlinks
            # are not followed: that would cost a stat per row on a network file system)
            problem = collisions.check(clip, path if "://" in path else os.path.abspath(path))
        if problem is not None:
            problems.append(problem)
            continue
        assert clip is not None
        clips.append(clip)
        if check_files and not files.exists(path):
            problems.append(
                ManifestProblem(clip.row, clip.source_id, RejectReason.MISSING_FILE.value, f"no file {path}",
                                clip.line, clip.key)
            )
    problems.sort(key=lambda p: p.row)
    return clips, problems


def validate(table_path: str | Path, *, duration: float, strict: bool = False, **options: Any) -> list[ManifestProblem]:
    """All problems of an input table (see ``read_clips`` for options); ``strict`` raises if there are any."""
    _, problems = read_clips(table_path, duration=duration, **options)
    if strict and problems:
        raise ManifestError(_problem_report(table_path, problems))
    return problems


def _problem_report(table_path: str | Path, problems: Sequence[ManifestProblem], limit: int = 20) -> str:
    lines = [f"{table_path}: {len(problems)} problem(s)"] + [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def _split_seed(seed: int, split: str) -> np.random.Generator:
    # one independent stream per split, so adding a split leaves the other splits' shards unchanged
    entropy = np.random.SeedSequence([seed, zlib.crc32(split.encode("utf-8"))])
    return np.random.Generator(np.random.PCG64(entropy))


def assign_shards(clips: Iterable[ClipRow], *, seed: int, samples_per_shard: int) -> list[ManifestRow]:
    """Seeded shard assignment; rows come back sorted by (split, shard, index_in_shard).

    Clips are sorted by key before the shuffle, so the assignment depends on the set of clips and the
    seed, not on the order of the input table.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    by_split: dict[str, list[ClipRow]] = {}
    for clip in clips:
        by_split.setdefault(clip.split, []).append(clip)
    rows: list[ManifestRow] = []
    for split in sorted(by_split):
        ordered = sorted(by_split[split], key=lambda c: c.key)
        order = _split_seed(seed, split).permutation(len(ordered))
        for position, index in enumerate(order):
            c = ordered[int(index)]
            shard = shard_name(split, position // samples_per_shard)
            rows.append(
                ManifestRow(
                    c.key,
                    c.source_id,
                    c.path,
                    c.start,
                    c.duration,
                    c.text,
                    split,
                    shard,
                    position % samples_per_shard,
                    c.row,
                    c.line,
                )
            )
    return rows


def build_manifest(
    table_path: str | Path,
    *,
    duration: float,
    seed: int,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    strict: bool = False,
    **options: Any,
) -> tuple[list[ManifestRow], list[ManifestProblem]]:
    """Read, validate and assign: the manifest rows and the problems found (``strict``: raise on any)."""
    clips, problems = read_clips(table_path, duration=duration, **options)
    if strict and problems:
        raise ManifestError(_problem_report(table_path, problems))
    return assign_shards(clips, seed=seed, samples_per_shard=samples_per_shard), problems


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("source_id", pa.string()),
            ("path", pa.string()),
            ("start", pa.float64()),
            ("duration", pa.float64()),
            ("text", pa.string()),
            ("split", pa.string()),
            ("shard", pa.string()),
            ("index_in_shard", pa.int32()),
            ("row", pa.int64()),
            ("line", pa.int64()),
        ]
    )


def write_manifest(rows: Sequence[ManifestRow], path: str | Path) -> None:
    """Write ``manifest.parquet`` deterministically (fixed schema and options, no pandas metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema()
    columns = {f.name: [getattr(r, f.name) for r in rows] for f in fields(ManifestRow)}
    table = pa.Table.from_pydict(columns, schema=schema)
    with atomic_target(Path(path)) as tmp:
        # one row group and fixed options: identical input gives identical bytes
        pq.write_table(table, tmp, compression="zstd", compression_level=3, row_group_size=max(1, len(rows)))


def read_manifest(path: str | Path, *, columns: Sequence[str] | None = None) -> list[ManifestRow]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    optional = ("line",)  # manifests written before lines were recorded have none
    missing = [f.name for f in fields(ManifestRow) if f.name not in table.column_names and f.name not in optional]
    if missing:
        raise ManifestError(f"{path}: not a manifest (missing columns {', '.join(missing)})")
    data = {f.name: table.column(f.name).to_pylist() for f in fields(ManifestRow) if f.name in table.column_names}
    return [ManifestRow(**{name: data[name][i] for name in data}) for i in range(table.num_rows)]


def manifest_hash(rows: Sequence[ManifestRow]) -> str:
    """sha256 of the rows' canonical JSON: identifies the content, whatever Parquet encoder wrote it."""
    digest = hashlib.sha256()
    names = [f.name for f in fields(ManifestRow)]
    for row in rows:
        # the fields in order, as dataclasses.astuple gives them (every field is a scalar), without its
        # per-value deepcopy: 4 of the 7 s of a 20k-row manifest step went there
        values = tuple(getattr(row, name) for name in names)
        if row.line is None:  # Parquet inputs and manifests from before lines were kept: the old hash
            values = values[:-1]
        digest.update(json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def rows_by_shard(rows: Iterable[ManifestRow]) -> dict[str, list[ManifestRow]]:
    """Shard name -> its rows in ``index_in_shard`` order (the order of the tar's samples)."""
    shards: dict[str, list[ManifestRow]] = {}
    for row in rows:
        shards.setdefault(row.shard, []).append(row)
    for members in shards.values():
        members.sort(key=lambda r: r.index_in_shard)
    return dict(sorted(shards.items()))


def check_row(row: ManifestRow, media_root: str | Path | None) -> Rejected | None:
    """The failure the job records for a row before decoding it (empty prompt, missing local file)."""
    if not row.text.strip():
        return Rejected(RejectReason.BAD_TEXT, f"{row.source_id} (input row {row.row}): empty or non-text prompt")
    path = resolve_media_path(row.path, media_root)
    if "://" not in path and not os.path.isfile(path):
        return Rejected(RejectReason.MISSING_FILE, f"{row.source_id} (input row {row.row}): no file {path}")
    return None
