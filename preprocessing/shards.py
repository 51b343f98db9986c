"""The dataset folder (DESIGN §6): layout, atomic writes, ``dataset.json``, shard markers and status.

```
DATASET/dataset.json                 DatasetInfo
DATASET/manifest.parquet             preprocessing.manifest
DATASET/shards/{shard}.tar           samples (preprocessing.shard_writer / shard_reader)
DATASET/shards/{shard}.json          ShardMarker: written last, its presence means "done"
DATASET/failures/{shard}.parquet     rejected inputs of the shard (always written, may be empty)
DATASET/failures/input.parquet       input rows rejected before shard assignment (always written)
DATASET/text/                        prompt features and the empty prompt (preprocessing.prompt_store)
```

Every file is written under a hidden temporary name in its final folder and renamed with
``os.replace``, so a reader sees either nothing or a complete file, and a crash at any point leaves
the shard "missing" for the next run. docs/shard-format.md describes every field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.latent_stats import LatentMoments, split_statistics
from preprocessing.redact import redact
from preprocessing.sample import ARRAY_FIELDS, MEDIA_FIELDS, OPTIONAL_ARRAY_FIELDS

FORMAT_VERSION = 1
TRAIN_SPLIT = "train"  # the split whose latent statistics the generator normalises with
DATASET_JSON = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
TMP_SUFFIX = ".tmp"


# tar member suffixes of one sample, in the order they are written; nothing else may appear in a shard
REQUIRED_MEMBERS: tuple[str, ...] = ("json", *MEDIA_FIELDS, *(f"{name}.npy" for name in ARRAY_FIELDS))
OPTIONAL_MEMBERS: tuple[str, ...] = tuple(f"{name}.npy" for name in OPTIONAL_ARRAY_FIELDS)
MEMBER_ORDER: tuple[str, ...] = REQUIRED_MEMBERS + OPTIONAL_MEMBERS
ALL_ARRAY_FIELDS: dict[str, np.dtype] = {**ARRAY_FIELDS, **OPTIONAL_ARRAY_FIELDS}


class ShardError(RuntimeError):
    """A shard file is damaged, incomplete, unsafe or does not match its manifest."""


@dataclass(frozen=True)
class Failure:
    """One rejected input: a row of ``failures/{shard}.parquet``."""

    key: str
    source_id: str
    reason: str  # a RejectReason value
    message: str
    row: int | None = None  # the input table's data row and text line (None: unknown or Parquet)
    line: int | None = None


FAILURE_COLUMNS = ("key", "source_id", "reason", "message", "row", "line")
INPUT_FAILURES = "input"  # failures/input.parquet: no shard has this name (shards end in -NNNNNN)


@dataclass(frozen=True)
class InputFailure:
    """An input row rejected before shard assignment: a row of ``failures/input.parquet``."""

    row: int
    line: int | None
    source_id: str
    key: str | None  # the clip's key where the row got that far (duplicates, too_short)
    reason: str  # bad_row, bad_text, too_short or duplicate
    message: str
    collides_with_row: int | None = None  # duplicate: the earlier row that owns the clip
    collides_with_line: int | None = None


def shard_tar_path(dataset_dir: str | Path, shard: str) -> Path:
    return Path(dataset_dir) / "shards" / f"{shard}.tar"


def shard_marker_path(dataset_dir: str | Path, shard: str) -> Path:
    return Path(dataset_dir) / "shards" / f"{shard}.json"


def failures_path(dataset_dir: str | Path, shard: str) -> Path:
    return Path(dataset_dir) / "failures" / f"{shard}.parquet"


def input_failures_path(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / "failures" / f"{INPUT_FAILURES}.parquet"


def split_of(shard: str) -> str:
    return shard.rsplit("-", 1)[0]


def temporary_path(path: Path) -> Path:
    """A hidden name next to ``path``, unique per writer: two attempts at the same shard (a retried
    task and a straggler) never write into one file; whichever renames last wins, with the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and rename it onto ``path``: readers see the old file, or the whole new one."""
    with open(tmp, "rb") as handle:  # durable before it becomes visible
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; commit it onto ``path`` if the block succeeds."""
    tmp = temporary_path(path)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def remove_stale_temporaries(dataset_dir: str | Path) -> list[Path]:
    """Delete temporary files left by killed writers; call only when no writer is running."""
    removed = []
    for folder in ("shards", "failures", "text", "."):
        for tmp in (Path(dataset_dir) / folder).glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@dataclass
class DatasetInfo:
    """``dataset.json``: what made the dataset, and how many samples it holds."""

    preset: str
    media_root: str  # where relative manifest paths resolve (a job may override it)
    encoders: dict[str, dict[str, Any]]  # role (t5, clip_text, codec, sync) -> {name, version, ...}
    sequence_lengths: dict[str, int]  # e.g. latent 250, t5 77, clip_text 77, sync_frames 200
    seed: int
    samples_per_shard: int
    manifest_hash: str  # preprocessing.manifest.manifest_hash
    clips: dict[str, int] = field(default_factory=dict)  # manifest rows per split
    shards: dict[str, int] = field(default_factory=dict)  # shards per split
    samples: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {ok, failed, shards_done}
    # the input table's rows: {"rows": N, "clips": M, "rejected": K, "rejected_by_reason": {...}}
    input_rows: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # package versions that wrote the data
    extra: dict[str, Any] = field(default_factory=dict)
    # What training needs from the data (docs/shard-format.md, "What training reads"):
    # {split, shards, clips, frames, mean[D], std[D], definition} of the train split (latent_stats.py)
    latent_stats: dict[str, Any] = field(default_factory=dict)
    # role (t5, t5_mask, clip_text) -> file of the empty prompt's features, relative to the dataset
    empty_prompt: dict[str, str] = field(default_factory=dict)
    prompt_store: dict[str, Any] = field(default_factory=dict)  # {folder, prompts, chunks}
    format_version: int = FORMAT_VERSION

    @property
    def ok_samples(self) -> int:
        """Samples in done shards, over every split."""
        return sum(split.get("ok", 0) for split in self.samples.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetInfo:
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ShardError(f"dataset format version {version} is newer than this code ({FORMAT_VERSION})")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def write_dataset_info(dataset_dir: str | Path, info: DatasetInfo) -> None:
    """Write ``dataset.json`` atomically. One writer (the job's driver): concurrent updates would race."""
    write_json_atomic(Path(dataset_dir) / DATASET_JSON, info.to_json())


def read_dataset_info(dataset_dir: str | Path) -> DatasetInfo:
    path = Path(dataset_dir) / DATASET_JSON
    try:
        return DatasetInfo.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ShardError(f"{path}: no dataset.json (not a dataset folder, or the manifest step never ran)") from None
    except (ValueError, TypeError) as exc:
        raise ShardError(f"{path}: unreadable dataset.json: {exc}") from exc


@dataclass
class ShardMarker:
    """``shards/{shard}.json``: the done-marker and the shard's statistics."""

    shard: str
    split: str
    tar_bytes: int
    tar_sha256: str
    num_expected: int  # manifest rows of the shard
    num_ok: int
    num_failed: int
    failures_by_reason: dict[str, int]
    keys: list[str]  # keys written to the tar, in tar order (the manifest order without failures)
    fields: dict[str, dict[str, Any]]  # array field -> {dtype, shape} (identical for every sample)
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent per stage for the shard
    # LatentMoments.to_json() of the shard's latent_mean arrays as stored (None: no sample, or an old marker)
    latent_moments: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardMarker:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def read_marker(dataset_dir: str | Path, shard: str) -> ShardMarker | None:
    """The shard's marker, or None if the shard has none (not done). A damaged marker raises."""
    path = shard_marker_path(dataset_dir, shard)
    try:
        return ShardMarker.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise ShardError(f"{path}: damaged marker: {exc}") from exc


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex; read in 1 MiB blocks (tars are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardState:
    shard: str
    split: str
    done: bool
    reason: str  # why it is not done ("" when done)
    marker: ShardMarker | None


def shard_state(dataset_dir: str | Path, shard: str, *, verify_sha: bool = False) -> ShardState:
    """Done = marker readable, tar present with the marker's size (and sha256 if asked), failures present."""
    split = split_of(shard)
    try:
        marker = read_marker(dataset_dir, shard)
    except ShardError as exc:
        return ShardState(shard, split, False, str(exc), None)
    if marker is None:
        return ShardState(shard, split, False, "no marker", None)
    tar = shard_tar_path(dataset_dir, shard)
    if not tar.is_file():
        return ShardState(shard, split, False, "marker without tar", marker)
    size = tar.stat().st_size
    if size != marker.tar_bytes:
        return ShardState(shard, split, False, f"tar has {size} bytes, marker says {marker.tar_bytes}", marker)
    if not failures_path(dataset_dir, shard).is_file():
        return ShardState(shard, split, False, "marker without failures file", marker)
    if verify_sha and file_sha256(tar) != marker.tar_sha256:
        return ShardState(shard, split, False, "tar sha256 differs from the marker", marker)
    return ShardState(shard, split, True, "", marker)


def manifest_shards(dataset_dir: str | Path) -> list[str]:
    """Every shard the manifest plans, sorted."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ShardError(f"{path}: no manifest")
    column = pq.read_table(path, columns=["shard"]).column("shard")
    return sorted(pc.unique(column).to_pylist())


def shard_states(dataset_dir: str | Path, *, verify_sha: bool = False) -> list[ShardState]:
    return [shard_state(dataset_dir, s, verify_sha=verify_sha) for s in manifest_shards(dataset_dir)]


def done_and_missing(dataset_dir: str | Path, *, verify_sha: bool = False) -> tuple[list[str], list[str]]:
    """(done shards, missing shards) of the manifest: the resume list of a rerun is the second one."""
    states = shard_states(dataset_dir, verify_sha=verify_sha)
    return [s.shard for s in states if s.done], [s.shard for s in states if not s.done]


def refresh_sample_counts(dataset_dir: str | Path) -> DatasetInfo:
    """Recount ``samples`` and recompute ``latent_stats`` in ``dataset.json`` from the done shards'
    markers, and rewrite it atomically.

    ``latent_stats`` merges the train shards' moments in shard-name order, so it is a function of the
    shards alone (a resumed job gives the same numbers). It is left empty while a done train shard has
    no moments (a marker from before they were recorded): statistics of part of the split would be
    silently wrong, and ``training.dataset_stats`` then says to rebuild.
    """
    info = read_dataset_info(dataset_dir)
    counts: dict[str, dict[str, int]] = {}
    moments: list[LatentMoments] = []
    train_clips, train_shards, without_moments = 0, 0, 0
    for state in shard_states(dataset_dir):  # sorted by shard name
        entry = counts.setdefault(state.split, {"ok": 0, "failed": 0, "shards_done": 0})
        if state.done and state.marker is not None:
            entry["ok"] += state.marker.num_ok
            entry["failed"] += state.marker.num_failed
            entry["shards_done"] += 1
            if state.split == TRAIN_SPLIT and state.marker.num_ok:
                train_shards += 1
                train_clips += state.marker.num_ok
                if state.marker.latent_moments is None:
                    without_moments += 1
                else:
                    moments.append(LatentMoments.from_json(state.marker.latent_moments))
    info.samples = counts
    info.latent_stats = {}
    if moments and not without_moments:
        info.latent_stats = split_statistics(moments, train_clips, train_shards, TRAIN_SPLIT)
    write_dataset_info(dataset_dir, info)
    return info


def _write_parquet(path: Path, columns: dict[str, list], schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict(columns, schema=schema)
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_failures(dataset_dir: str | Path, shard: str, failures: list[Failure]) -> None:
    """``failures/{shard}.parquet`` from failures in manifest order (written atomically, may be empty)."""
    import pyarrow as pa

    types = {"row": pa.int64(), "line": pa.int64()}
    schema = pa.schema([(name, types.get(name, pa.string())) for name in FAILURE_COLUMNS])
    columns = {name: [getattr(f, name) for f in failures] for name in FAILURE_COLUMNS}
    # a decoder's message may quote a media URL with user:password or a signed query: never stored
    columns["message"] = [redact(m) if m else m for m in columns["message"]]
    _write_parquet(failures_path(dataset_dir, shard), columns, schema)


def write_input_failures(dataset_dir: str | Path, failures: list[InputFailure]) -> None:
    """``failures/input.parquet``, one row per rejected input row in table order (may be empty)."""
    import pyarrow as pa

    names = [f.name for f in fields(InputFailure)]
    ints = {"row", "line", "collides_with_row", "collides_with_line"}
    schema = pa.schema([(name, pa.int64() if name in ints else pa.string()) for name in names])
    columns = {n: [getattr(f, n) for f in failures] for n in names}
    columns = {n: [redact(v) if isinstance(v, str) else v for v in values] for n, values in columns.items()}
    _write_parquet(input_failures_path(dataset_dir), columns, schema)


def read_input_failures(dataset_dir: str | Path) -> list[InputFailure]:
    """The input rows rejected before shard assignment (empty for datasets made before the table existed)."""
    import pyarrow.parquet as pq

    path = input_failures_path(dataset_dir)
    if not path.is_file():
        return []
    try:
        data = pq.read_table(path).to_pylist()
        return [InputFailure(**{f.name: item.get(f.name) for f in fields(InputFailure)}) for item in data]
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ShardError(f"{path}: unreadable input failures table: {exc}") from exc


def read_failures(dataset_dir: str | Path, shard: str) -> list[Failure]:
    """The rejected inputs of a shard (empty if it has no failures file yet)."""
    import pyarrow.parquet as pq

    path = failures_path(dataset_dir, shard)
    if not path.is_file():
        return []
    try:
        data = pq.read_table(path).to_pylist()  # tables written before row/line were kept lack them
        return [Failure(**{name: item.get(name) for name in FAILURE_COLUMNS}) for item in data]
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ShardError(f"{path}: unreadable failures table: {exc}") from exc
