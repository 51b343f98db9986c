"""Turn one shard's manifest rows into a written shard: decode, run the frozen encoders, write.

This is the unit of work of the precompute job, free of Ray so that it runs (and is tested and
benchmarked) in a plain process too. A :class:`ShardProcessor` loads the frozen encoders once. Text
features come from the dataset's prompt store (``preprocessing.prompt_store``), which the job fills
before the shards run (:meth:`ShardProcessor.store_prompts`), so each distinct prompt is encoded once
per dataset; a prompt missing from the store is encoded here (and counted), which keeps the class
usable without the store. A per-worker LRU keeps recent prompts' features in memory.

Errors are classed by ``preprocessing.faults``: data errors (a bad clip) and missing files are
recorded as failures of the shard and never retried; a storage or network fault is retried with
the settings' back-off and then fails the shard (:class:`TransientFault`), so that nothing is recorded
and a rerun tries again; anything else (a bug, an encoder error, a full disk) propagates, because
recording it per clip would hide a real fault.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from preprocessing.compact import encode_flac, encode_sync_mp4
from preprocessing.errors import Rejected, RejectReason
from preprocessing.faults import DEFAULT_RETRY_DELAYS, FaultClass, TransientFault, classify, describe
from preprocessing.manifest import ManifestRow, check_row, resolve_media_path
from preprocessing.media import DecodedClip, decode_clip
from preprocessing.media_probe import IO_TIMEOUT_S
from preprocessing.prompt_store import EmptyPrompt, PromptFeatures, PromptStore, write_chunk, write_empty_prompt
from preprocessing.sample import Sample, SampleMeta
from preprocessing.shard_writer import ShardWriter
from selva.encoders import FrozenEncoders, build_encoders
from selva.presets import ModelPreset, get_preset
from selva.sequence import SequenceConfig

TEXT_CACHE_SIZE = 1024  # prompts; ~0.17 GB at the official widths (77 x 1024 CLIP tokens, float16)


@dataclass(frozen=True)
class WorkerSettings:
    """A shard worker's settings: which encoders to build and where, how to batch and decode, the
    failure budget and the storage-fault back-off. Small and picklable: sent to every Ray worker."""

    preset: str = "tiny"
    encoders: str = "embedded"
    weights: str | None = None
    device: str = "cpu"
    batch_size: int = 16
    max_failed_fraction: float = 0.5
    decode_threads: int = 1  # a worker owns one CPU: FFmpeg's automatic threads would oversubscribe
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS  # back-off before each retry of a storage fault
    io_timeout_s: float = IO_TIMEOUT_S  # a URL read waiting longer is a storage fault (a silent server)


@dataclass
class ShardResult:
    shard: str
    ok: int = 0
    failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    reused: int = 0  # samples carried over from an earlier attempt (--retry-failed)
    retries: int = 0  # clip reads retried after a storage or network fault (none of them a failure)
    prompts_encoded: int = 0  # prompts the worker had to encode itself (not in the store): 0 in a full job


class ShardProcessor:
    def __init__(self, settings: WorkerSettings):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise in a job log
        self.settings = settings
        self.preset: ModelPreset = get_preset(settings.preset)
        self.seq = SequenceConfig(self.preset.duration)
        self.device = torch.device(settings.device)
        # encode only: precompute never decodes audio, so the official vocoder is not needed
        self.encoders: FrozenEncoders = build_encoders(
            settings.encoders, self.preset, settings.weights, self.device, decoder=False
        )
        # LRU of prompt features: repeated labels (VGGSound has 310) are encoded once per worker, while
        # a caption dataset with millions of distinct prompts cannot grow the cache without bound.
        self._text_cache: OrderedDict[str, PromptFeatures] = OrderedDict()
        self._store: PromptStore | None = None
        self.prompts_encoded = 0  # encoder calls per prompt, over the processor's lifetime

    # -- per clip ---------------------------------------------------------------------------------
    def _decode(self, row: ManifestRow, media_root: str | None) -> DecodedClip:
        problem = check_row(row, media_root)
        if problem is not None:
            raise problem
        path = resolve_media_path(row.path, media_root)
        return decode_clip(
            path, start=row.start, duration=row.duration, frame_size=self.preset.frame_size,
            threads=self.settings.decode_threads,
            io_timeout_s=self.settings.io_timeout_s,
        )

    def _decode_retrying(self, row: ManifestRow, media_root: str | None, result: ShardResult) -> DecodedClip:
        """``_decode``, with storage faults retried after each of ``settings.retry_delays``; then
        :class:`TransientFault`. Data errors raise :class:`Rejected`; bugs propagate."""
        delays = self.settings.retry_delays
        for attempt in range(len(delays) + 1):
            try:
                return self._decode(row, media_root)
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
                result.retries += 1
                time.sleep(delays[attempt])
        raise AssertionError("unreachable")

    def encode_prompt(self, text: str) -> PromptFeatures:
        """One prompt's features as a shard stores them: T5 real tokens (L, D) float16 and mask (L,),
        CLIP tokens (77, D) float16.

        One prompt at a time: batched encoding pads to the batch's longest prompt, and which prompts
        share a batch depends on scheduling, so batching could change a feature's last bits between runs.
        """
        t5 = self.encoders.t5.encode([text])
        clip = self.encoders.clip.encode([text])
        n = int(t5.mask[0].sum())
        self.prompts_encoded += 1
        # keep only real tokens (the loader pads per batch); float16, as the shard stores them
        return (
            t5.tokens[0, :n].cpu().numpy().astype(np.float16),
            t5.mask[0, :n].cpu().numpy(),
            clip.tokens[0].cpu().numpy().astype(np.float16),
        )

    def store_prompts(self, dataset_dir: str | Path, prompts: Sequence[str]) -> int:
        """Encode ``prompts`` (each once, in sorted order) into one chunk of the prompt store; returns
        how many were encoded."""
        features = {text: self.encode_prompt(text) for text in sorted(set(prompts))}
        if features:
            write_chunk(dataset_dir, features)
        return len(features)

    def empty_prompt(self) -> EmptyPrompt:
        """Features of "" from this dataset's encoders (``TextEncoder.empty``), stored as a prompt's are
        (float16, T5 real tokens only): see ``preprocessing.prompt_store``."""
        t5, clip = self.encoders.t5.empty(), self.encoders.clip.empty()
        n = int(t5.mask[0].sum())
        return EmptyPrompt(
            t5.tokens[0, :n].cpu().numpy().astype(np.float16),
            t5.mask[0, :n].cpu().numpy(),
            clip.tokens[0].cpu().numpy().astype(np.float16),
        )

    def store_empty_prompt(self, dataset_dir: str | Path) -> None:
        write_empty_prompt(dataset_dir, self.empty_prompt())

    def _text_features(self, texts: Sequence[str], store: PromptStore | None = None) -> dict[str, PromptFeatures]:
        """Features of ``texts``: from the worker's cache, else the store, else encoded here."""
        for text in texts:
            if text in self._text_cache:
                self._text_cache.move_to_end(text)
        for text in sorted({t for t in texts if t not in self._text_cache}):
            stored = store.get(text) if store is not None else None
            self._text_cache[text] = stored if stored is not None else self.encode_prompt(text)
        wanted = {t: self._text_cache[t] for t in texts}
        while len(self._text_cache) > max(TEXT_CACHE_SIZE, len(wanted)):
            self._text_cache.popitem(last=False)
        return wanted

    def _prompt_store(self, dataset_dir: str | Path) -> PromptStore:
        """The dataset's store, kept across shards (its index is read once, then only when a prompt is new)."""
        if self._store is None or self._store.folder != PromptStore(dataset_dir).folder:
            self._store = PromptStore(dataset_dir)
        return self._store

    @torch.inference_mode()
    def _latents(self, clips: Sequence[DecodedClip]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for i in range(0, len(clips), self.settings.batch_size):
            wave = torch.from_numpy(np.stack([c.audio for c in clips[i : i + self.settings.batch_size]]))
            mean, std = self.encoders.codec.encode(wave.to(self.device))
            out.extend(zip(mean.float().cpu().numpy(), std.float().cpu().numpy(), strict=True))
        return out

    # -- per shard --------------------------------------------------------------------------------
    def encode_clips(
        self, dataset_dir: str | Path, shard: str, decoded: Sequence[tuple[ManifestRow, DecodedClip]]
    ) -> dict[str, Sample]:
        """The samples of ``shard``'s decoded clips, by key: latents from the codec, prompt features
        from the dataset's store (else encoded here), frames and audio compacted as a shard stores them.

        Public so that a clip made in memory (``pipelines.train_world``) becomes a sample exactly as a
        decoded file does."""
        text_features = self._text_features([row.text for row, _ in decoded], self._prompt_store(dataset_dir))
        latents = self._latents([clip for _, clip in decoded])
        samples = {}
        for (row, clip), (mean, std) in zip(decoded, latents, strict=True):
            t5, t5_mask, clip_text = text_features[row.text]
            samples[row.key] = Sample(
                meta=SampleMeta(row.key, row.source_id, row.text, row.start, row.duration, row.split, shard),
                sync_mp4=encode_sync_mp4(clip.frames, fps=clip.fps),
                audio_flac=encode_flac(clip.audio, clip.sample_rate),
                arrays={"latent_mean": mean, "latent_std": std, "t5": t5, "t5_mask": t5_mask, "clip_text": clip_text},
            )
        return samples

    def process(
        self,
        dataset_dir: str | Path,
        shard: str,
        rows: Sequence[ManifestRow],
        media_root: str | None,
        reuse: dict[str, Sample] | None = None,
        crashed: Mapping[str, int] | None = None,
        before_clip: Callable[[ManifestRow], None] | None = None,
    ) -> ShardResult:
        """Decode, encode and write ``shard``. ``reuse`` maps keys to samples kept from an earlier
        attempt (``--retry-failed`` re-attempts only the recorded failures). ``crashed`` maps keys of
        clips that killed their worker to the number of crashes: they are recorded as
        ``crashes_worker``, not decoded again. ``before_clip`` runs before each clip is decoded (the
        Ray worker leaves a breadcrumb there, so that a crash can be blamed on its clip)."""
        reuse = reuse or {}
        crashed = crashed or {}
        timings = {"decode": 0.0, "encode": 0.0}
        result = ShardResult(shard)
        decoded: list[tuple[ManifestRow, DecodedClip]] = []
        failures: list[tuple[str, Rejected]] = []
        start = time.perf_counter()
        for row in rows:
            if row.key in reuse:
                continue
            if row.key in crashed:
                message = (
                    f"{resolve_media_path(row.path, media_root)} ({row.source_id}, input row {row.row}): "
                    f"the worker decoding it died {crashed[row.key]} times (a crash or an out-of-memory kill)"
                )
                failures.append((row.key, Rejected(RejectReason.CRASHES_WORKER, message)))
                continue
            if before_clip is not None:
                before_clip(row)
            try:
                decoded.append((row, self._decode_retrying(row, media_root, result)))
            except Rejected as err:
                failures.append((row.key, err))
        timings["decode"] = time.perf_counter() - start

        start = time.perf_counter()
        encoded_before = self.prompts_encoded
        samples = {**reuse, **self.encode_clips(dataset_dir, shard, decoded)}
        timings["encode"] = time.perf_counter() - start

        failed = dict(failures)
        with ShardWriter(dataset_dir, shard, rows, max_failed_fraction=self.settings.max_failed_fraction) as writer:
            for row in rows:  # manifest order
                if row.key in failed:
                    writer.reject_error(row.key, failed[row.key])
                else:
                    writer.add(samples[row.key])
            marker = writer.finish(timings)
        result.ok, result.failed = marker.num_ok, marker.num_failed
        result.failures_by_reason = dict(marker.failures_by_reason)
        result.timings = dict(marker.timings)
        result.reused = len(reuse)
        result.prompts_encoded = self.prompts_encoded - encoded_before
        return result
