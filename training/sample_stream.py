"""One worker's batches: raw samples -> seeded shuffle buffer -> skip (resume) -> decode -> batch.

Everything a worker yields is a pure function of (shard list, seed, epoch, rank, worker): the plan
(training/shard_order.py) fixes what it reads, the shuffle buffer and the re-draw order come from
seeded generators, and samples that fail to decode are skipped in the same places every time.
That is what makes an exact resume possible: a worker told to skip its first ``k`` raw samples
replays the same buffer on raw bytes (cheap) and decodes nothing until it reaches sample ``k + 1``.

Stages, in order (WebDataset's own ``shuffle``/``split_by_node`` stages are not used: their state
cannot be saved and replayed):

1. rounds of raw samples: round 0 reads the worker's own segments; when its quota of batches is not
   filled (spare slots of the equal-steps rule, samples that failed), round ``r >= 1`` re-reads its
   re-draw pool in an order seeded by ``r``;
2. a shuffle buffer per round, seeded by (seed, epoch, rank, worker, round), holding raw bytes;
3. skip the first ``skip`` raw samples (already trained on before the checkpoint);
4. decode (``decode_sample`` for json + arrays, ``decode_sync_mp4`` for frames), check shapes, and
   count and skip a sample that fails;
5. collate ``batch_size`` samples into one batch dict, tagged with the worker's stream position.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from preprocessing.compact import decode_sync_mp4, rgb_frames
from preprocessing.sample import VARIABLE_LENGTH_FIELDS
from preprocessing.shard_reader import decode_sample
from preprocessing.shards import ShardError
from training.shard_order import ShardSource, WorkerPlan, seeded_rng
from training.tar_stream import READ_RETRY_DELAYS, READ_STALL_S, ErrorLog, RawSample, iter_segment

STREAM_KEY = "_stream"  # bookkeeping the loader strips from each batch before handing it out


@dataclass(frozen=True)
class StreamSpec:
    """Everything one rank's workers need for an epoch; picklable, so it can cross into DataLoader workers."""

    source: ShardSource
    plans: tuple[WorkerPlan, ...]  # one per worker
    seed: int
    epoch: int
    batch_size: int
    shuffle_buffer: int
    done_batches: tuple[int, ...]  # per worker: batches already yielded this epoch (resume)
    skip: tuple[int, ...]  # per worker: raw samples consumed by those batches (resume)
    # The DataLoader hands its first task to its worker 0; resuming at batch b, that batch belongs to
    # worker b % W, so DataLoader worker d plays planned worker (d + first_worker) % W.
    first_worker: int = 0
    max_consecutive_errors: int = 1000
    error_log_interval_s: float = 60.0
    read_retry_delays: tuple[float, ...] = READ_RETRY_DELAYS
    read_stall_s: float = READ_STALL_S


def shuffled(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer: fill ``size`` items, then emit a random one per item read; drain at the end."""
    if size <= 1:  # no buffer: read order
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    while buffer:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()


def raw_rounds(spec: StreamSpec, plan: WorkerPlan, errors: ErrorLog) -> Iterator[RawSample]:
    """Stages 1-2: the worker's segments through a seeded buffer, then seeded re-draw rounds forever."""
    ids = (spec.seed, spec.epoch, plan.rank, plan.worker)
    for round_ in itertools.count():
        if round_ == 0:
            segments = list(plan.segments)
        else:
            order = seeded_rng("redraw", *ids, round_).permutation(len(plan.redraw))
            segments = [plan.redraw[i] for i in order]
        raw = (
            s for seg in segments
            for s in iter_segment(
                spec.source.shards[seg.shard], seg, errors, spec.read_retry_delays, spec.read_stall_s
            )
        )  # fmt: skip
        emitted = 0
        for sample in shuffled(raw, spec.shuffle_buffer, seeded_rng("shuffle", *ids, round_)):
            emitted += 1
            yield sample
        if round_ > 0 and emitted == 0:
            raise RuntimeError(
                f"rank {plan.rank} worker {plan.worker}: no sample of its re-draw pool can be read "
                f"({len(plan.redraw)} segment(s)); error totals: {dict(errors.counts)}"
            )


def _check_shapes(sample: dict[str, Any], source: ShardSource, reference: dict[str, Any] | None) -> None:
    """Refuse a sample that could not be stacked with its batch (wrong frame count, array shapes)."""
    video = sample["video_u8"]
    if source.num_frames is not None and video.shape[0] != source.num_frames:
        raise ValueError(f"sync.mp4 has {video.shape[0]} frames, the dataset's clips have {source.num_frames}")
    for name, shape in (source.field_shapes or {}).items():
        array = sample.get(name)
        if array is None:
            raise ValueError(f"no {name} array, the shard's samples have one")
        if array.ndim != len(shape) or any(want not in (-1, got) for want, got in zip(shape, array.shape, strict=True)):
            raise ValueError(f"{name} has shape {array.shape}, the shard's marker says {tuple(shape)}")
    if reference is not None:
        if video.shape != reference["video_u8"].shape:
            raise ValueError(f"frames {video.shape} differ from the batch's {reference['video_u8'].shape}")
        for name, array in sample.items():
            if isinstance(array, np.ndarray) and name != "video_u8":
                other = reference.get(name)
                fixed = slice(1, None) if name in VARIABLE_LENGTH_FIELDS else slice(None)
                if other is None or array.shape[fixed] != other.shape[fixed]:
                    raise ValueError(f"{name} shape {array.shape} differs from the batch's")
        if set(sample) != set(reference):
            raise ValueError(f"fields {sorted(sample)} differ from the batch's {sorted(reference)}")


def decode_frames(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """``sync.mp4`` bytes to uint8 RGB frames (T, S, S, 3); with ``out``, decoded straight into it.

    ``decode_sync_mp4`` stacks its frames into a new array, which the batch would then copy again:
    at 224 px that is two extra 30 MB copies per sample (~15% of the decode's CPU time). Decoding
    into the batch's own (shared-memory) slot saves both; ``out`` also fixes the expected shape.
    """
    if out is None:
        return decode_sync_mp4(data)
    count = 0
    for rgb in rgb_frames(data):
        if count == len(out) or rgb.shape != out.shape[1:]:
            raise ValueError(f"sync.mp4 frames differ from the batch's {out.shape[:3]} (frame {count})")
        out[count] = rgb
        count += 1
    if count != len(out):
        raise ValueError(f"sync.mp4 has {count} frames, the batch's clips have {len(out)}")
    return out


def decode_raw(
    raw: RawSample, source: ShardSource, reference: dict[str, Any] | None = None, frames: np.ndarray | None = None
) -> dict[str, Any]:
    """Stage 4: one sample as numpy arrays (json + npy via the shard reader: no pickle; frames via PyAV).

    ``frames``: the batch slot to decode the clip into (see :func:`decode_frames`).
    """
    if raw.problem is not None:
        raise ShardError(f"{raw.source}: {raw.problem}")
    sample = decode_sample(raw.key, raw.members, raw.source)
    decoded = {"key": sample.key, "text": sample.meta.text, "video_u8": decode_frames(sample.sync_mp4, frames)}
    decoded.update(sample.arrays)
    _check_shapes(decoded, source, reference)
    return decoded


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory (as torch's own collate
    does): the batch then crosses to the main process as a handle instead of being pickled and
    copied (a 224-pixel batch of 2 is 60 MB of frames).

    ``share_memory_`` is the public way there; it moves the fresh allocation into shared memory with
    one copy, which costs little because nothing has touched its pages yet (measured: within noise
    of allocating in shared memory directly, next to the frames' decode).
    """
    tensor = torch.empty(shape, dtype=dtype)
    return tensor.share_memory_() if shared else tensor


def _stacked(arrays: list[np.ndarray], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    out = _empty((len(arrays), *arrays[0].shape), dtype, shared)
    view = out.numpy()  # numpy's copy loops beat a one-thread torch copy here
    for i, array in enumerate(arrays):
        view[i] = array  # casts (fp16 -> fp32) while copying
    return out


def collate(samples: list[dict[str, Any]], shared: bool = False, frames: torch.Tensor | None = None) -> dict[str, Any]:
    """Stage 5: stack a batch; pad ``t5``/``t5_mask`` to the batch's longest prompt (mask False on padding).

    ``shared``: allocate the tensors in shared memory (set inside DataLoader workers). ``frames``: the
    batch's frames when the clips were decoded straight into it, else they are stacked here.
    """
    first = samples[0]
    batch: dict[str, Any] = {
        "key": [s["key"] for s in samples],
        "text": [s["text"] for s in samples],
        "video_u8": frames if frames is not None else _stacked([s["video_u8"] for s in samples], torch.uint8, shared),
    }
    lengths = [len(s["t5"]) for s in samples]
    t5 = _empty((len(samples), max(lengths), *first["t5"].shape[1:]), torch.float32, shared).zero_()
    mask = _empty((len(samples), max(lengths)), torch.bool, shared).zero_()
    for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        t5.numpy()[i, :n] = s["t5"]
        mask.numpy()[i, :n] = s["t5_mask"]
    batch["t5"], batch["t5_mask"] = t5, mask
    for name, array in first.items():
        if isinstance(array, np.ndarray) and name not in batch:
            dtype = torch.bool if array.dtype == np.bool_ else torch.float32
            batch[name] = _stacked([s[name] for s in samples], dtype, shared)
    return batch


def worker_batches(spec: StreamSpec, worker: int) -> Iterator[dict[str, Any]]:
    """The batches worker ``worker`` still owes this epoch (all of them, or those after a resume point)."""
    plan = spec.plans[worker]
    todo = plan.batches - spec.done_batches[worker]
    if todo <= 0:
        return
    errors = ErrorLog(f"loader rank {plan.rank} worker {worker}", spec.error_log_interval_s)
    in_worker = torch.utils.data.get_worker_info() is not None
    skip = spec.skip[worker]
    errors.muted = skip > 0  # what is skipped was counted by the run that wrote the checkpoint
    position, failed_in_a_row, pending = 0, 0, []
    frames: torch.Tensor | None = None  # the batch's frames, allocated once its first clip is decoded
    for raw in raw_rounds(spec, plan, errors):
        position += 1
        if position <= skip:
            errors.muted = position < skip
            continue
        try:
            if pending:
                assert frames is not None
                sample = decode_raw(raw, spec.source, pending[0], frames.numpy()[len(pending)])
            else:
                sample = decode_raw(raw, spec.source)
                frames = _empty((spec.batch_size, *sample["video_u8"].shape), torch.uint8, in_worker)
                frames.numpy()[0] = sample["video_u8"]
                sample["video_u8"] = frames.numpy()[0]
        except Exception as exc:  # one bad sample (corrupt member, undecodable mp4) must not end the run
            message = f"{raw.source}: sample {raw.key} ({type(exc).__name__}: {exc})"
            errors.record("sample", message, ident=(raw.source, raw.key))
            failed_in_a_row += 1
            if failed_in_a_row >= spec.max_consecutive_errors:
                raise RuntimeError(
                    f"loader rank {plan.rank} worker {worker}: {failed_in_a_row} samples in a row failed to "
                    f"decode, the last {raw.key} of {raw.source}: {exc}"
                ) from exc
            continue
        failed_in_a_row = 0
        pending.append(sample)
        if len(pending) == spec.batch_size:
            batch = collate(pending, shared=in_worker, frames=frames)
            frames = None
            batch[STREAM_KEY] = {"worker": worker, "position": position, "errors": dict(errors.counts)}
            pending = []
            yield batch
            todo -= 1
            if todo == 0:
                return
