"""Writing one shard: the tar, the failures table, and the done-marker last (DESIGN §6).

``ShardWriter`` streams samples into a temporary tar, so a shard never has to fit in memory. Every
manifest row of the shard must end up either as a sample (``add``, in manifest order) or as a failure
(``reject``, any time); ``finish`` refuses a shard with unaccounted rows. Output is deterministic: tar
headers carry no time, owner or permissions of the writing machine, members follow the manifest order
and a fixed per-sample order, and arrays are cast to the dtypes of ``ARRAY_FIELDS`` and saved as
little-endian C-order ``.npy`` -- so writing the same samples again gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.errors import Rejected, RejectReason
from preprocessing.latent_stats import LatentMoments
from preprocessing.manifest import ManifestRow
from preprocessing.sample import ARRAY_FIELDS, VARIABLE_LENGTH_FIELDS, Sample
from preprocessing.shards import (
    ALL_ARRAY_FIELDS,
    Failure,
    ShardError,
    ShardMarker,
    commit,
    shard_marker_path,
    shard_tar_path,
    split_of,
    temporary_path,
    write_failures,
    write_json_atomic,
)


class FailureBudgetExceeded(ShardError):
    """Too many inputs of one shard were rejected: a broken input set or job, not a few bad clips."""


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through (no second read of the tar)."""

    def __init__(self, handle: Any):
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._handle.write(data)

    def tell(self) -> int:
        return self.size


def _encode_array(key: str, name: str, value: np.ndarray) -> np.ndarray:
    target = ALL_ARRAY_FIELDS[name]
    array = np.asarray(value)
    where = f"sample {key} field {name}"
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{where}: dtype {array.dtype} cannot be stored (numbers or booleans only)")
    if target.kind == "b":
        if array.dtype.kind != "b" and not np.isin(array, (0, 1)).all():
            raise ValueError(f"{where}: a mask must hold only 0 and 1")
    elif not np.isfinite(array).all():
        raise ValueError(f"{where}: holds NaN or infinity")
    with np.errstate(over="ignore"):  # overflow is reported below, with the field's name
        cast = array.astype(target.newbyteorder("<"))
    if target.kind == "f" and not np.isfinite(cast).all():
        raise ValueError(f"{where}: values overflow {target} (max |x| {np.abs(array).max():.4g})")
    return np.ascontiguousarray(cast)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Write ``shard`` of ``dataset_dir`` for the manifest ``rows`` of that shard (in index order).

    ``max_failed_fraction``: if more than this share of the rows is rejected, ``finish`` writes the
    failures table (for inspection) but no tar and no marker, and raises ``FailureBudgetExceeded``.
    Use as a context manager: an exception inside the block leaves nothing but a removed temporary.
    """

    def __init__(
        self, dataset_dir: str | Path, shard: str, rows: Sequence[ManifestRow], *, max_failed_fraction: float = 1.0
    ):
        self.dataset_dir = Path(dataset_dir)
        self.shard = shard
        self.split = split_of(shard)
        self.rows = sorted(rows, key=lambda r: r.index_in_shard)
        wrong = [r.key for r in self.rows if r.shard != shard]
        if wrong:
            raise ShardError(f"{shard}: rows of other shards given: {wrong[:5]}")
        self._row_of = {r.key: r for r in self.rows}
        self.max_failed_fraction = max_failed_fraction
        self._next = 0  # index of the next row a sample may be written for
        self._written: list[str] = []
        self._failures: dict[str, Failure] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._moments: LatentMoments | None = None  # of the latent_mean arrays as stored (float32)
        self._seconds = 0.0
        self._tar_path = shard_tar_path(self.dataset_dir, shard)
        self._tmp = temporary_path(self._tar_path)
        self._handle = open(self._tmp, "wb")
        self._hashing = _HashingFile(self._handle)
        # USTAR: plain fixed-size headers; keys are 16 hex digits, so names stay far below its limits
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        self._tar.addfile(info, io.BytesIO(data))

    def _skip_rejected(self) -> None:
        while self._next < len(self.rows) and self.rows[self._next].key in self._failures:
            self._next += 1

    def add(self, sample: Sample) -> None:
        """Append the sample of the next unaccounted manifest row (raises if it is not that row's)."""
        began = time.perf_counter()
        meta = sample.meta
        self._skip_rejected()
        if self._next >= len(self.rows) or self.rows[self._next].key != meta.key:
            expected = self.rows[self._next].key if self._next < len(self.rows) else "none (all rows accounted for)"
            raise ShardError(f"{self.shard}: sample {meta.key} out of manifest order; next expected is {expected}")
        row = self.rows[self._next]
        if (meta.source_id, meta.shard, meta.split) != (row.source_id, self.shard, self.split):
            raise ShardError(
                f"{self.shard}: sample {meta.key} meta (source_id={meta.source_id!r}, shard={meta.shard!r}, "
                f"split={meta.split!r}) does not match its manifest row ({row.source_id!r}, {self.shard!r})"
            )
        unknown = set(sample.arrays) - set(ALL_ARRAY_FIELDS)
        missing = set(ARRAY_FIELDS) - set(sample.arrays)
        if unknown or missing:
            raise ValueError(f"sample {meta.key}: unknown arrays {sorted(unknown)}, missing arrays {sorted(missing)}")
        if not sample.sync_mp4 or not sample.audio_flac:
            raise ValueError(f"sample {meta.key}: empty sync.mp4 or audio.flac")
        arrays = {
            name: _encode_array(meta.key, name, sample.arrays[name])
            for name in ALL_ARRAY_FIELDS
            if name in sample.arrays
        }
        # every sample must bring the same fields and shapes, but for the prompt's token count (-1)
        shapes = {name: (-1, *a.shape[1:]) if name in VARIABLE_LENGTH_FIELDS else a.shape for name, a in arrays.items()}
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(f"sample {meta.key}: array shapes {shapes} differ from the shard's {self._shapes}")

        meta_json = json.dumps(meta.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        self._member(f"{meta.key}.json", meta_json.encode("utf-8"))
        self._member(f"{meta.key}.sync.mp4", bytes(sample.sync_mp4))
        self._member(f"{meta.key}.audio.flac", bytes(sample.audio_flac))
        for name, array in arrays.items():  # ALL_ARRAY_FIELDS order
            self._member(f"{meta.key}.{name}.npy", _npy_bytes(array))
        # merged sample by sample in tar order: the shard's moments depend only on its content
        moments = LatentMoments.of(arrays["latent_mean"])
        self._moments = moments if self._moments is None else self._moments.merge(moments)
        self._written.append(meta.key)
        self._next += 1
        self._seconds += time.perf_counter() - began

    def reject(self, key: str, reason: RejectReason | str, message: str) -> None:
        """Record a rejected input of this shard (any row not yet written)."""
        row = self._row_of.get(key)
        if row is None:
            raise ShardError(f"{self.shard}: rejected key {key} is not in this shard")
        if key in self._failures or key in self._written:
            raise ShardError(f"{self.shard}: key {key} already has a result")
        self._failures[key] = Failure(key, row.source_id, RejectReason(reason).value, message, row.row, row.line)

    def reject_error(self, key: str, error: Rejected) -> None:
        self.reject(key, error.reason, error.message)

    def _write_failures(self) -> None:
        ordered = [self._failures[r.key] for r in self.rows if r.key in self._failures]
        write_failures(self.dataset_dir, self.shard, ordered)

    def finish(self, timings: Mapping[str, float] | None = None) -> ShardMarker:
        """Commit the tar, then the failures table, then the marker; returns the marker."""
        began = time.perf_counter()
        self._skip_rejected()
        try:
            if self._next < len(self.rows):
                left = [r.key for r in self.rows[self._next :] if r.key not in self._failures]
                raise ShardError(f"{self.shard}: {len(left)} row(s) have neither a sample nor a failure: {left[:5]}")
            by_reason: dict[str, int] = {}
            for failure in self._failures.values():
                by_reason[failure.reason] = by_reason.get(failure.reason, 0) + 1
            if self.rows and len(self._failures) / len(self.rows) > self.max_failed_fraction:
                self._write_failures()  # kept so that `selva inspect` shows why the shard failed
                raise FailureBudgetExceeded(
                    f"{self.shard}: {len(self._failures)} of {len(self.rows)} inputs rejected "
                    f"(budget {self.max_failed_fraction:.0%}): {dict(sorted(by_reason.items()))}"
                )
            self._tar.close()  # end-of-archive blocks
            self._handle.close()
            self._closed = True
            commit(self._tmp, self._tar_path)
            self._write_failures()
        except BaseException:
            self.abort()
            raise
        shapes = self._shapes or {}
        marker = ShardMarker(
            shard=self.shard,
            split=self.split,
            tar_bytes=self._hashing.size,
            tar_sha256=self._hashing.sha256.hexdigest(),
            num_expected=len(self.rows),
            num_ok=len(self._written),
            num_failed=len(self._failures),
            failures_by_reason=dict(sorted(by_reason.items())),
            keys=list(self._written),
            fields={n: {"dtype": ALL_ARRAY_FIELDS[n].str, "shape": list(s)} for n, s in shapes.items()},
            timings={**dict(timings or {}), "write": self._seconds + time.perf_counter() - began},
            latent_moments=self._moments.to_json() if self._moments is not None else None,
        )
        write_json_atomic(shard_marker_path(self.dataset_dir, self.shard), marker.to_json())  # last: "done"
        return marker

    def abort(self) -> None:
        """Drop the temporary tar; nothing of this attempt stays visible."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):  # the tar is thrown away anyway
                self._tar.close()
            self._handle.close()
        self._tmp.unlink(missing_ok=True)


def write_shard(
    dataset_dir: str | Path,
    shard: str,
    rows: Sequence[ManifestRow],
    samples: Iterable[Sample],
    failures: Iterable[Failure] = (),
    *,
    timings: Mapping[str, float] | None = None,
    max_failed_fraction: float = 1.0,
) -> ShardMarker:
    """Write a whole shard from samples in any order (they are put in manifest order first)."""
    with ShardWriter(dataset_dir, shard, rows, max_failed_fraction=max_failed_fraction) as writer:
        for failure in failures:
            writer.reject(failure.key, failure.reason, failure.message)
        by_key = {s.meta.key: s for s in samples}
        for row in writer.rows:
            if row.key in by_key:
                writer.add(by_key.pop(row.key))
        if by_key:
            raise ShardError(f"{shard}: samples for keys not in this shard: {sorted(by_key)[:5]}")
        return writer.finish(timings)
