"""The training data loader: shards -> shuffled, evenly sized, resumable batches -> online mixing.

Streams the WebDataset shards of a dataset folder (or a list of shard URLs: local paths, ``file:``,
``pipe:CMD``, ``http(s)://``) through torch DataLoader workers. docs/training-data.md explains the
design; in short:

* **Order.** Each epoch's shard order is shuffled by ``(seed, epoch)`` before it is split between
  ranks and then workers (training/shard_order.py); each worker reads its share through a shuffle
  buffer seeded by ``(seed, epoch, rank, worker)`` (training/sample_stream.py). The DataLoader runs
  ``in_order``, so batch ``i`` of an epoch always comes from worker ``i % num_workers``.
* **Equal steps.** Every rank yields exactly ``batches_per_epoch = ceil(G / (world_size * batch))``
  batches per epoch (``G`` = samples in the split, from the shard markers), so no rank waits on
  another at a collective. Spare slots and the slots of samples that fail to decode are filled by
  re-drawing from the worker's own share in a seeded order.
* **Errors.** A sample that fails (corrupt member, undecodable mp4, wrong shape) is counted and
  skipped; a shard that cannot be read is counted with the samples it lost. Logging is rate-limited
  (one line per ``error_log_interval_s`` per worker, with running totals); :attr:`TrainLoader.error_counts`
  has the totals.
* **Exact resume.** :meth:`TrainLoader.state_dict` is ``(epoch, batches done, each worker's raw
  stream position)`` plus the layout it is valid for. Restoring it in a fresh loader continues the
  very same batches: each worker replays its seeded stream on raw bytes, decoding nothing, up to its
  position. Mixing uses ``selva.mixing.mixing_generator(mix.seed, step, rank)`` with ``step`` the
  rank's global batch index (``epoch * batches_per_epoch + batch``), so mixing resumes too.
* **Safety.** Arrays are read by ``preprocessing.shard_reader`` (``.npy`` checked before use, never
  unpickled), unknown tar members are refused unread; WebDataset's decoders are never used.

Batch contract (what iterating a :class:`TrainLoader` yields; B = batch size, T frames, S pixels):

| key | value |
|---|---|
| ``"key"`` | ``list[str]`` sample keys |
| ``"text"`` | ``list[str]`` prompts (the target's, also for mixed samples) |
| ``"video_u8"`` | ``(B, T, S, S, 3)`` uint8 RGB sync frames, as decoded from ``sync.mp4`` |
| ``"latent_mean"``, ``"latent_std"`` | ``(B, N, D)`` float32 codec posterior |
| ``"t5"`` | ``(B, L, D_t5)`` float32, padded with zeros to the batch's longest prompt ``L`` |
| ``"t5_mask"`` | ``(B, L)`` bool, True on real tokens, False on padding |
| ``"clip_text"`` | ``(B, 77, D_clip)`` float32 |
| ``"sync_feat"`` | optional ``(B, 192, 768)`` float32 frozen Synchformer features (baselines) |
| ``"video"`` | with ``mix``: ``(B, T, 3, S, S)`` float in [-1, 1], mixed and normalised once |
| ``"mix"`` | with ``mix``: a ``selva.mixing.MixInfo`` (mixed, lam, target_left, partner, width) |

With ``device`` set, tensors are moved there (non-blocking when ``pin_memory``) before mixing,
so mixing runs on the training device, as DESIGN §5 asks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from selva.mixing import MixConfig, apply_to_batch, mixing_generator
from training.sample_stream import STREAM_KEY, StreamSpec, worker_batches
from training.shard_order import ShardSource, batches_per_rank, open_source, plan_rank, worker_batch_count
from training.tar_stream import READ_RETRY_DELAYS, READ_STALL_S

log = logging.getLogger("selva.loader")

STATE_VERSION = 1


@dataclass(frozen=True)
class LoaderConfig:
    """How to batch and shuffle. ``num_workers`` 0 reads in the calling process (as one worker)."""

    batch_size: int = 8
    num_workers: int = 2
    # raw samples per worker (~20-60 KB each at 64 px, ~0.1-0.5 MB at 224 px): see docs/training-data.md
    shuffle_buffer: int = 256
    seed: int = 0
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool = False
    max_consecutive_errors: int = 1000  # beyond this the data is broken, not a few bad samples: raise
    error_log_interval_s: float = 60.0
    timeout_s: float = 0.0  # DataLoader timeout per batch (0: wait forever)
    # back-off of a shard re-read after a storage or network fault; past the last, ShardReadError stops training
    read_retry_delays: tuple[float, ...] = READ_RETRY_DELAYS
    # an http(s) shard read that moves no byte for this long is a storage fault (a server that went silent)
    read_stall_s: float = READ_STALL_S

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0 or self.prefetch_factor < 1:
            raise ValueError(f"bad LoaderConfig: {self}")


class RankStream(IterableDataset):
    """One rank's epoch as an IterableDataset: each DataLoader worker yields its own planned batches."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        if workers != len(self.spec.plans):
            raise RuntimeError(f"planned for {len(self.spec.plans)} worker(s), running in {workers}")
        worker = (info.id if info is not None else 0) + self.spec.first_worker
        return worker_batches(self.spec, worker % workers)


class TrainLoader:
    """Batches for one rank, epoch after epoch; iterate it (endless) or call :meth:`epoch_batches`."""

    def __init__(
        self,
        source: ShardSource,
        cfg: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        mix: MixConfig | None = None,
        device: torch.device | str | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.source, self.cfg, self.rank, self.world_size = source, cfg, rank, world_size
        self.mix = mix
        self.device = torch.device(device) if device is not None else None
        self.workers = max(1, cfg.num_workers)
        self.batches_per_epoch = batches_per_rank(source.samples_per_epoch, world_size, cfg.batch_size)
        self._epoch = 0
        self._batch = 0  # batches of the current epoch already handed out
        self._positions = [0] * self.workers  # raw samples each worker consumed for them
        self._errors_before: Counter[str] = Counter()  # finished epochs (and the run before a resume)
        self._worker_errors: list[dict[str, int]] = [{} for _ in range(self.workers)]

    # -------------------------------------------------------------------------------- position
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batch_in_epoch(self) -> int:
        return self._batch

    @property
    def step(self) -> int:
        """Global index of the next batch on this rank (the mixing generator's ``step``)."""
        return self._epoch * self.batches_per_epoch + self._batch

    @property
    def error_counts(self) -> dict[str, int]:
        """Data errors so far by kind: ``sample`` (skipped samples), ``shard`` (samples lost with an
        unreadable shard), ``member`` (stray tar members); and ``read_retry``: shard re-reads after a
        storage or network fault (no sample lost)."""
        total = Counter(self._errors_before)
        for counts in self._worker_errors:
            total.update(counts)
        return dict(total)

    def _layout(self) -> dict[str, Any]:
        return {
            "seed": self.cfg.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "workers": self.workers,
            "batch_size": self.cfg.batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "source": self.source.fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; counts every batch already handed out. Each rank saves its own."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            "positions": list(self._positions),
            "errors": self.error_counts,
            **self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Continue exactly where ``state`` was taken. The layout (seed, world size, rank, workers,
        batch size, shard list) must match; with ``strict=False`` a different layout starts cleanly at
        the next epoch boundary instead (an exact continuation is impossible then)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        mine = self._layout()
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        self._errors_before = Counter(state.get("errors", {}))
        self._worker_errors = [{} for _ in range(self.workers)]
        if differ:
            described = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differ.items())
            if strict:
                raise ValueError(f"loader state was saved for another layout ({described}); cannot resume exactly")
            log.warning("loader state from another layout (%s): starting at the next epoch boundary", described)
            self.set_epoch(int(state["epoch"]) + (1 if state["batch"] else 0))
            return
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._positions = [int(p) for p in state["positions"]]

    def set_epoch(self, epoch: int) -> None:
        """Start at the beginning of ``epoch`` (no mid-epoch position)."""
        self._epoch, self._batch, self._positions = epoch, 0, [0] * self.workers

    def _fold_errors(self) -> None:
        """Bank the workers' counts before their streams end (a new stream counts from zero)."""
        for counts in self._worker_errors:
            self._errors_before.update(counts)
        self._worker_errors = [{} for _ in range(self.workers)]

    def _next_epoch(self) -> None:
        self._fold_errors()
        self.set_epoch(self._epoch + 1)

    # -------------------------------------------------------------------------------- iteration
    def _spec(self) -> StreamSpec:
        cfg = self.cfg
        plans = plan_rank(
            self.source,
            seed=cfg.seed,
            epoch=self._epoch,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.workers,
            batch_size=cfg.batch_size,
        )
        done = tuple(worker_batch_count(self._batch, self.workers, w) for w in range(self.workers))
        return StreamSpec(
            self.source,
            plans,
            cfg.seed,
            self._epoch,
            cfg.batch_size,
            cfg.shuffle_buffer,
            done_batches=done,
            skip=tuple(self._positions),
            first_worker=self._batch % self.workers,
            max_consecutive_errors=cfg.max_consecutive_errors,
            error_log_interval_s=cfg.error_log_interval_s,
            read_retry_delays=tuple(cfg.read_retry_delays),
            read_stall_s=cfg.read_stall_s,
        )

    def _finish(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        if self.device is not None:
            asynchronous = self.cfg.pin_memory  # only a pinned host tensor can be copied asynchronously
            move = lambda v: v.to(self.device, non_blocking=asynchronous) if torch.is_tensor(v) else v
            batch = {k: move(v) for k, v in batch.items()}
        if self.mix is not None:
            batch = apply_to_batch(batch, self.mix, mixing_generator(self.mix.seed, step, self.rank))
        return batch

    def epoch_batches(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch (all of it unless resumed mid-epoch); then the next epoch is current."""
        if self._batch >= self.batches_per_epoch:
            self._next_epoch()
        self._fold_errors()  # iteration stopped mid-epoch and restarted: the new workers count afresh
        stream = RankStream(self._spec())
        if self.cfg.num_workers == 0:
            batches: Any = iter(stream)
        else:
            batches = iter(
                DataLoader(
                    stream,
                    batch_size=None,  # workers batch themselves: a batch is one worker's consecutive samples
                    num_workers=self.workers,
                    in_order=True,  # batch i from worker i % workers: the order the resume arithmetic assumes
                    prefetch_factor=self.cfg.prefetch_factor,
                    pin_memory=self.cfg.pin_memory,
                    timeout=self.cfg.timeout_s,
                    persistent_workers=False,  # a new epoch needs new plans in the workers
                )
            )
        try:
            for batch in batches:
                info = batch.pop(STREAM_KEY)
                worker = self._batch % self.workers
                if info["worker"] != worker:
                    raise RuntimeError(f"batch {self._batch} came from worker {info['worker']}, expected {worker}")
                self._positions[worker] = int(info["position"])
                self._worker_errors[worker] = dict(info["errors"])
                step = self.step
                self._batch += 1  # before yielding: a state saved while the trainer uses it counts it
                yield self._finish(batch, step)
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if self._batch != self.batches_per_epoch:
            raise RuntimeError(
                f"rank {self.rank}: epoch {self._epoch} ended after {self._batch} batches, "
                f"expected {self.batches_per_epoch}"
            )
        self._next_epoch()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.epoch_batches()


def build_loader(
    inputs: str | Path | Sequence[str | Path],
    cfg: LoaderConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    allow_partial: bool = False,
    samples_per_epoch: int | None = None,
    mix: MixConfig | None = None,
    device: torch.device | str | None = None,
) -> TrainLoader:
    """A loader over a dataset folder or shard URLs (see :func:`training.shard_order.open_source`)."""
    source = open_source(inputs, split=split, allow_partial=allow_partial, samples_per_epoch=samples_per_epoch)
    return TrainLoader(source, cfg, rank=rank, world_size=world_size, mix=mix, device=device)
