"""Which samples each (rank, worker) reads in an epoch: a pure function of the shard list and seeds.

Nothing here opens a tar. Given the shards (with their sample counts where known), a seed, an
epoch, the world size, the number of DataLoader workers and the batch size, :func:`plan_rank`
says exactly which stretch of which shard every worker of a rank reads, how many batches it must
yield, and where it draws extra samples when its share runs short. Because the plan is pure, a
restarted run (or ``selva data check``) recomputes the very same plan from the same numbers.

The equal-steps rule (see docs/training-data.md):

* ``G`` = samples in an epoch (the markers' ``num_ok`` summed, or ``samples_per_epoch`` for
  shards whose counts are unknown); every rank yields ``B = ceil(G / (world_size * batch))``
  batches per epoch, and worker ``w`` of ``W`` yields the batches ``i`` with ``i % W == w``.
* Counts known: the epoch's shard order (shuffled by ``(seed, epoch)``) is laid end to end as one
  sequence of ``G`` samples and cut into ``world_size`` contiguous ranges of ``floor`` or ``ceil``
  of ``G / world_size`` samples, each then cut into per-worker ranges in proportion to the
  workers' batch quotas. Every sample is read exactly once per epoch; the ``B * world * batch - G``
  (< ``world * batch``) spare slots, and the slots of samples that fail to decode, are filled by
  re-drawing from the worker's own ranges in a seeded order.
* Counts unknown: whole shards are dealt round-robin (rank, then worker) from the shuffled order;
  a worker stops at its quota and re-draws when it runs short, so coverage is only as good as the
  ``samples_per_epoch`` estimate.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.shards import ShardError, read_dataset_info, shard_marker_path, shard_states, shard_tar_path


@dataclass(frozen=True)
class ShardEntry:
    """One shard to stream: where it is, how many samples it holds, and its marker if local."""

    url: str  # local path, file:, pipe:CMD, http(s)://... (anything webdataset.gopen opens)
    num_samples: int | None  # the marker's num_ok; None when no marker was available
    marker: str | None = None  # local marker path: the reader checks each key against its ``keys``


@dataclass(frozen=True)
class ShardSource:
    """The shards of a training split and what is known about them."""

    shards: tuple[ShardEntry, ...]
    samples_per_epoch: int  # G in the equal-steps rule
    counts_known: bool  # every shard has num_samples (sample-exact ranges), else whole-shard dealing
    field_shapes: dict[str, tuple[int, ...]] | None = None  # array field -> shape (-1: any length)
    num_frames: int | None = None  # sync frames per clip, when dataset.json says

    def fingerprint(self) -> str:
        """Identifies the shard list, so a resume onto a different list is refused. Built from the
        shards' file names and counts, not their full URLs: a dataset moved to another mount point or
        bucket is still the same list."""
        names = [[s.url.rsplit("/", 1)[-1], s.num_samples] for s in self.shards]
        text = json.dumps([*names, self.samples_per_epoch])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _field_shapes(fields: dict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in spec["shape"]) for name, spec in fields.items()}


def source_from_dataset(dataset_dir: str | Path, *, split: str = "train", allow_partial: bool = False) -> ShardSource:
    """The done shards of ``split`` in a dataset folder, with counts from their markers.

    A split with shards that are not done is an error (the epoch would silently be smaller than the
    dataset) unless ``allow_partial``; shards whose every input failed hold no samples and are left out.
    """
    info = read_dataset_info(dataset_dir)  # raises a clear ShardError when this is not a dataset folder
    states = [s for s in shard_states(dataset_dir) if s.split == split]
    if not states:
        raise ShardError(f"{dataset_dir}: the manifest has no shards for split {split!r}")
    missing = [s for s in states if not s.done]
    if missing and not allow_partial:
        listed = ", ".join(f"{s.shard} ({s.reason})" for s in missing[:5])
        raise ShardError(
            f"{dataset_dir}: {len(missing)} of {len(states)} {split} shard(s) are not done: {listed}"
            f"{' ...' if len(missing) > 5 else ''}; finish the precompute job or pass allow_partial"
        )
    entries, shapes = [], None
    for state in states:
        if not state.done or state.marker is None or state.marker.num_ok == 0:
            continue
        shapes = shapes or _field_shapes(state.marker.fields)
        entries.append(
            ShardEntry(
                str(shard_tar_path(dataset_dir, state.shard)),
                state.marker.num_ok,
                str(shard_marker_path(dataset_dir, state.shard)),
            )
        )
    total = sum(e.num_samples or 0 for e in entries)
    if total == 0:
        raise ShardError(f"{dataset_dir}: split {split!r} has no samples in done shards")
    frames = info.sequence_lengths.get("sync_frames")
    return ShardSource(tuple(entries), total, True, shapes, int(frames) if frames else None)


def local_path(url: str) -> Path | None:
    if url.startswith("file:"):
        return Path(url[len("file:") :].removeprefix("//"))
    return None if "://" in url or url.startswith("pipe:") else Path(url)


def _sibling_marker(url: str) -> tuple[int, str, dict] | None:
    """(num_ok, marker path, fields) from ``X.json`` next to a local ``X.tar``, if it vouches for it."""
    path = local_path(url)
    if path is None or path.suffix != ".tar":
        return None
    marker_path = path.with_suffix(".json")
    try:
        data = json.loads(marker_path.read_text(encoding="utf-8"))
        vouched = int(data["tar_bytes"]) == path.stat().st_size
        return (int(data["num_ok"]), str(marker_path), data.get("fields", {})) if vouched else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no marker, or not ours: the shard's count is unknown


def expand_urls(urls: Sequence[str]) -> list[str]:
    """Brace-expand each URL the way WebDataset does (``shards/train-{000000..000009}.tar``)."""
    import braceexpand

    return [u for url in urls for u in braceexpand.braceexpand(url)]


def source_from_urls(urls: Sequence[str], *, samples_per_epoch: int | None = None) -> ShardSource:
    """Shards given as URLs. A local ``X.tar`` with a marker ``X.json`` of the right size has a known
    count; if any shard's count is unknown, ``samples_per_epoch`` is required and sets ``G``."""
    expanded = expand_urls(urls)
    if not expanded:
        raise ShardError("no shard URLs given")
    found = [_sibling_marker(u) for u in expanded]
    shapes = next((_field_shapes(f[2]) for f in found if f is not None), None)
    if all(f is not None for f in found):
        entries = tuple(ShardEntry(u, f[0], f[1]) for u, f in zip(expanded, found, strict=True) if f[0] > 0)
        total = sum(e.num_samples or 0 for e in entries)
        if samples_per_epoch is not None and samples_per_epoch != total:
            raise ShardError(
                f"samples_per_epoch={samples_per_epoch} given, but the shards' markers count {total} samples"
            )
        if total == 0:
            raise ShardError("the given shards hold no samples")
        return ShardSource(entries, total, True, shapes)
    if samples_per_epoch is None or samples_per_epoch <= 0:
        unknown = [u for u, f in zip(expanded, found, strict=True) if f is None]
        raise ShardError(
            f"{len(unknown)} shard URL(s) have no readable marker (e.g. {unknown[0]}): their sample counts are "
            "unknown, so pass samples_per_epoch (--samples-per-epoch) to fix the epoch length"
        )
    entries = tuple(ShardEntry(u, None, None) for u in expanded)
    return ShardSource(entries, samples_per_epoch, False, shapes)


def open_source(
    inputs: str | Path | Sequence[str | Path],
    *,
    split: str = "train",
    allow_partial: bool = False,
    samples_per_epoch: int | None = None,
) -> ShardSource:
    """A dataset folder (one path holding ``dataset.json``) or a list of shard URLs."""
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if len(items) == 1 and (Path(items[0]) / "dataset.json").is_file():
        if samples_per_epoch is not None:
            raise ShardError("samples_per_epoch is only for shard URLs without markers; a dataset folder counts")
        return source_from_dataset(items[0], split=split, allow_partial=allow_partial)
    folders = [str(i) for i in items if Path(i).is_dir()]
    if folders:
        raise ShardError(f"{folders[0]}: a folder without dataset.json is not a dataset (give one, or shard URLs)")
    return source_from_urls([str(i) for i in items], samples_per_epoch=samples_per_epoch)


# ----------------------------------------------------------------------------------------------- plans


def seeded_rng(purpose: str, *parts: int) -> np.random.Generator:
    """A generator that depends only on ``purpose`` and ``parts`` (never on the process or the host).

    The purpose tag keeps the streams (shard order, shuffle buffer, re-draws) independent even when
    they are built from the same numbers.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([zlib.crc32(purpose.encode()), *parts])))


def batches_per_rank(samples_per_epoch: int, world_size: int, batch_size: int) -> int:
    """``ceil(G / (world_size * batch))``: enough slots for every sample, fewer than one batch per rank spare."""
    if samples_per_epoch <= 0:
        raise ValueError("an epoch needs at least one sample")
    return math.ceil(samples_per_epoch / (world_size * batch_size))


def worker_batch_count(batches: int, num_workers: int, worker: int) -> int:
    """Batches ``worker`` yields when batch ``i`` comes from worker ``i % num_workers``."""
    return batches // num_workers + (1 if worker < batches % num_workers else 0)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard order; the same on every rank, since it is drawn before any split."""
    return [int(i) for i in seeded_rng("shard-order", seed, epoch).permutation(num_shards)]


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of a shard, by position in its tar (``stop`` None: to the end)."""

    shard: int  # index into ShardSource.shards
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class WorkerPlan:
    rank: int
    worker: int
    batches: int  # batches this worker yields in the epoch
    segments: tuple[Segment, ...]  # its share of the epoch, in reading order
    redraw: tuple[Segment, ...]  # where it draws replacements when the share runs short


def _cut(bounds: list[int], lo: int, hi: int, order: list[int]) -> tuple[Segment, ...]:
    """Samples ``[lo, hi)`` of the epoch's concatenated shard sequence as per-shard segments."""
    segments = []
    i = bisect.bisect_right(bounds, lo) - 1
    while lo < hi:
        start, stop = bounds[i], bounds[i + 1]
        if stop > lo:
            segments.append(Segment(order[i], lo - start, min(hi, stop) - start))
            lo = min(hi, stop)
        i += 1
    return tuple(segments)


def plan_rank(
    source: ShardSource, *, seed: int, epoch: int, rank: int, world_size: int, num_workers: int, batch_size: int
) -> tuple[WorkerPlan, ...]:
    """What each of the ``num_workers`` workers of ``rank`` reads in ``epoch`` (see the module docstring)."""
    if not 0 <= rank < world_size or num_workers < 1 or batch_size < 1:
        raise ValueError(f"bad layout: rank {rank} of {world_size}, {num_workers} worker(s), batch {batch_size}")
    batches = batches_per_rank(source.samples_per_epoch, world_size, batch_size)
    quotas = [worker_batch_count(batches, num_workers, w) * batch_size for w in range(num_workers)]
    order = shard_order(len(source.shards), seed, epoch)
    everything = tuple(Segment(i) for i in order)

    if source.counts_known:
        counts = [source.shards[i].num_samples or 0 for i in order]
        bounds = [0, *np.cumsum(counts).tolist()]
        total = bounds[-1]
        lo, hi = total * rank // world_size, total * (rank + 1) // world_size
        # proportional to the quotas, so a worker with one batch less also reads fewer samples
        cum = [0, *np.cumsum(quotas).tolist()]
        cuts = [lo + (hi - lo) * c // cum[-1] for c in cum]
        shares = [_cut(bounds, cuts[w], cuts[w + 1], order) for w in range(num_workers)]
        rank_share = _cut(bounds, lo, hi, order)
    else:
        rank_shards = order[rank::world_size]
        shares = [tuple(Segment(i) for i in rank_shards[w::num_workers]) for w in range(num_workers)]
        rank_share = tuple(Segment(i) for i in rank_shards)

    plans = []
    for w in range(num_workers):
        # a worker with no share of its own (tiny datasets, many workers) re-draws from its rank's,
        # and a rank with none at all from the whole epoch: the step count never depends on luck
        redraw = shares[w] or rank_share or everything
        plans.append(WorkerPlan(rank, w, quotas[w] // batch_size, shares[w], redraw))
    return tuple(plans)
