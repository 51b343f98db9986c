"""The CPU half of a shard: decode its clips and compact them as the shard stores them, no encoder.

Precompute has two halves per shard: this one (FFmpeg decode, ``sync.mp4`` and FLAC encoding: CPU
work that scales with cores) and the encoder half (audio latents and prompt features:
``pipelines.shard_processor``; on a GPU node that is GPU work). In the one-stage design a worker does
both; in the two-stage design (``pipelines.ray_two_stage``) this half runs as a plain CPU task and
sends its result, the waveforms rather than the frames, to an encoder actor that writes the shard.
Both designs run this same code, so they write the same bytes (docs/shard-format.md).

Errors are classed by ``preprocessing.faults``: a bad clip or a missing file becomes a recorded
failure; a storage or network fault is retried with the settings' back-off and then raises
:class:`TransientFault` (nothing recorded: a rerun tries again); anything else propagates.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from preprocessing.compact import encode_flac, encode_sync_mp4
from preprocessing.errors import Rejected, RejectReason
from preprocessing.faults import DEFAULT_RETRY_DELAYS, FaultClass, TransientFault, classify, describe
from preprocessing.manifest import ManifestRow, check_row, resolve_media_path
from preprocessing.media import DecodedClip, decode_clip
from preprocessing.media_probe import IO_TIMEOUT_S
from selva.presets import get_preset


@dataclass(frozen=True)
class DecodeSettings:
    """How to decode: the preset sets frame size and clip length; ``threads`` FFmpeg threads per clip (a
    decoder owns one CPU: FFmpeg's automatic threads would oversubscribe); the storage-fault back-off."""

    preset: str = "tiny"
    threads: int = 1
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    io_timeout_s: float = IO_TIMEOUT_S


@dataclass(frozen=True)
class CompactClip:
    """One decoded clip as a shard stores it, plus the waveform its latent is computed from.
    ``audio``: (N,) float32 at the preset's rate, peak-normalised (``decode_clip``)."""

    row: ManifestRow
    sync_mp4: bytes
    audio_flac: bytes
    audio: np.ndarray


@dataclass
class DecodedShard:
    """A shard's decode result, picklable (it crosses Ray's object store). ``failures`` are
    ``(key, reason, message)`` in manifest order; ``started``/``ended`` are wall-clock seconds (epoch) of
    the decode, ``where`` the host and process that ran it (the tests check concurrency with them)."""

    shard: str
    clips: list[CompactClip] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    retries: int = 0  # clip reads retried after a storage or network fault
    seconds: float = 0.0
    started: float = 0.0
    ended: float = 0.0
    where: str = ""
    node: str = ""  # the Ray node id, when a Ray runner ran it

    def rejections(self) -> dict[str, Rejected]:
        return {key: Rejected(reason, message) for key, reason, message in self.failures}


def compact(row: ManifestRow, clip: DecodedClip) -> CompactClip:
    """``clip`` compacted for the shard: frames to ``sync.mp4``, audio to FLAC (both bit-exact)."""
    return CompactClip(row, encode_sync_mp4(clip.frames, fps=clip.fps), encode_flac(clip.audio, clip.sample_rate),
                       np.ascontiguousarray(clip.audio, dtype=np.float32))  # fmt: skip


class ClipDecoder:
    """Decodes manifest rows for one preset; cheap to build (no encoder, no weights)."""

    def __init__(self, settings: DecodeSettings):
        self.settings = settings
        preset = get_preset(settings.preset)
        self.frame_size = preset.frame_size
        self.seq = preset.seq  # the audio is decoded at the preset's rate (16 or 44.1 kHz)

    def decode(self, row: ManifestRow, media_root: str | None) -> DecodedClip:
        problem = check_row(row, media_root)
        if problem is not None:
            raise problem
        return decode_clip(
            resolve_media_path(row.path, media_root), start=row.start, duration=row.duration,
            frame_size=self.frame_size, sample_rate=self.seq.sampling_rate,
            spectrogram_frame_rate=self.seq.spectrogram_frame_rate, threads=self.settings.threads,
            io_timeout_s=self.settings.io_timeout_s,
        )  # fmt: skip

    def decode_retrying(self, row: ManifestRow, media_root: str | None, out: DecodedShard) -> DecodedClip:
        """``decode``, with storage faults retried after each of ``settings.retry_delays`` (counted in
        ``out.retries``); then :class:`TransientFault`. Data errors raise :class:`Rejected`; bugs propagate."""
        delays = self.settings.retry_delays
        for attempt in range(len(delays) + 1):
            try:
                return self.decode(row, media_root)
            except Rejected:
                raise
            except Exception as err:  # noqa: BLE001 - classified below; nothing is swallowed
                kind = classify(err)
                where = f"{resolve_media_path(row.path, media_root)} ({row.source_id}, input row {row.row})"
                if kind is FaultClass.DATA:  # an FFmpeg error that escaped decode_clip's own checks
                    raise Rejected(RejectReason.UNDECODABLE, f"{where}: {describe(err)}") from None
                if kind is FaultClass.MISSING:
                    raise Rejected(RejectReason.MISSING_FILE, f"{where}: {describe(err)}") from None
                if kind is not FaultClass.TRANSIENT:
                    raise
                if attempt == len(delays):
                    raise TransientFault(
                        f"{where}: storage or network fault in {attempt + 1} attempts: {describe(err)}"
                    ) from err
                out.retries += 1
                time.sleep(delays[attempt])
        raise AssertionError("unreachable")

    def decode_shard(
        self,
        shard: str,
        rows: Sequence[ManifestRow],
        media_root: str | None,
        skip: frozenset[str] = frozenset(),
        crashed: Mapping[str, int] | None = None,
        before_clip: Callable[[ManifestRow], None] | None = None,
    ) -> DecodedShard:
        """Decode and compact ``rows`` in manifest order. ``skip``: keys kept from an earlier attempt
        (``--retry-failed``), not decoded. ``crashed``: keys of clips that killed their worker, with the
        number of deaths: recorded as ``crashes_worker``, not decoded again. ``before_clip`` runs before
        each decode (the Ray runners leave a breadcrumb there, so that a crash is blamed on its clip)."""
        crashed = crashed or {}
        out = DecodedShard(shard, started=time.time(), where=f"{socket.gethostname()}:{os.getpid()}")
        began = time.perf_counter()
        for row in rows:
            if row.key in skip:
                continue
            if row.key in crashed:
                message = (
                    f"{resolve_media_path(row.path, media_root)} ({row.source_id}, input row {row.row}): "
                    f"the worker decoding it died {crashed[row.key]} times (a crash or an out-of-memory kill)"
                )
                out.failures.append((row.key, RejectReason.CRASHES_WORKER.value, message))
                continue
            if before_clip is not None:
                before_clip(row)
            try:
                clip = self.decode_retrying(row, media_root, out)
            except Rejected as err:
                out.failures.append((row.key, err.reason.value, err.message))
                continue
            out.clips.append(compact(row, clip))
        out.seconds = time.perf_counter() - began
        out.ended = time.time()
        return out
