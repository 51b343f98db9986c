"""Turn one shard's manifest rows into a written shard: decode, run the frozen encoders, write.

The decode half (CPU: FFmpeg, ``sync.mp4`` and FLAC) is ``pipelines.shard_decode``; this module holds
the encoders and writes. :meth:`ShardProcessor.process` runs both halves in one process (the
one-stage design); the two-stage design (``pipelines.ray_two_stage``) decodes in CPU tasks and calls
:meth:`ShardProcessor.write` on an encoder actor. Free of Ray, so that it runs (and is tested and
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

import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.shard_decode import ClipDecoder, CompactClip, DecodedShard, DecodeSettings, compact
from preprocessing.faults import DEFAULT_RETRY_DELAYS
from preprocessing.manifest import ManifestRow
from preprocessing.media import DecodedClip
from preprocessing.media_probe import IO_TIMEOUT_S
from preprocessing.prompt_store import EmptyPrompt, PromptFeatures, PromptStore, write_chunk, write_empty_prompt
from preprocessing.sample import Sample, SampleMeta
from preprocessing.shard_writer import ShardWriter
from selva.encoders import FrozenEncoders, build_encoders
from selva.presets import ModelPreset, get_preset

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

    def decode_settings(self) -> DecodeSettings:
        return DecodeSettings(self.preset, self.decode_threads, tuple(self.retry_delays), self.io_timeout_s)


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
    encode_batches: list[int] = field(default_factory=list)  # clips per codec batch, in order
    encoder: str = ""  # host:pid of the process whose encoders wrote the shard
    decoder: str = ""  # host:pid of the process that decoded it
    decode_span: tuple[float, float] = (0.0, 0.0)  # wall-clock start and end of the decode (epoch s)
    decoder_node: str = ""  # Ray node ids (set by the Ray runners; empty in a plain process)
    encoder_node: str = ""


class ShardProcessor:
    def __init__(self, settings: WorkerSettings):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise in a job log
        self.settings = settings
        self.preset: ModelPreset = get_preset(settings.preset)
        self.seq = self.preset.seq
        self.device = torch.device(settings.device)
        # encode only: precompute never decodes audio, so the official vocoder is not needed
        self.encoders: FrozenEncoders = build_encoders(
            settings.encoders, self.preset, settings.weights, self.device, decoder=False
        )
        # LRU of prompt features: repeated labels (VGGSound has 310) are encoded once per worker, while
        # a caption dataset with millions of distinct prompts cannot grow the cache without bound.
        self._text_cache: OrderedDict[str, PromptFeatures] = OrderedDict()
        self._store: PromptStore | None = None
        self.decoder = ClipDecoder(settings.decode_settings())
        self.prompts_encoded = 0  # encoder calls per prompt, over the processor's lifetime

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
    def _latents(self, audio: Sequence[np.ndarray]) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
        """Codec posteriors (mean, std) of each waveform, and the batch sizes used. Batches are consecutive
        runs of ``batch_size`` clips in the order given (a shard's decoded clips in manifest order): which
        clips share a batch is fixed by the manifest, never by scheduling."""
        out, batches = [], []
        for i in range(0, len(audio), self.settings.batch_size):
            wave = torch.from_numpy(np.stack(audio[i : i + self.settings.batch_size]))
            mean, std = self.encoders.codec.encode(wave.to(self.device))
            out.extend(zip(mean.float().cpu().numpy(), std.float().cpu().numpy(), strict=True))
            batches.append(wave.shape[0])
        return out, batches

    # -- per shard --------------------------------------------------------------------------------
    def samples(
        self, dataset_dir: str | Path, shard: str, clips: Sequence[CompactClip]
    ) -> tuple[dict[str, Sample], list[int]]:
        """The samples of ``shard``'s compacted clips, by key (latents from the codec, prompt features
        from the dataset's store, else encoded here), and the codec's batch sizes."""
        text_features = self._text_features([c.row.text for c in clips], self._prompt_store(dataset_dir))
        latents, batches = self._latents([c.audio for c in clips])
        samples = {}
        for c, (mean, std) in zip(clips, latents, strict=True):
            row = c.row
            t5, t5_mask, clip_text = text_features[row.text]
            samples[row.key] = Sample(
                meta=SampleMeta(row.key, row.source_id, row.text, row.start, row.duration, row.split, shard),
                sync_mp4=c.sync_mp4,
                audio_flac=c.audio_flac,
                arrays={"latent_mean": mean, "latent_std": std, "t5": t5, "t5_mask": t5_mask, "clip_text": clip_text},
            )
        return samples, batches

    def encode_clips(
        self, dataset_dir: str | Path, shard: str, decoded: Sequence[tuple[ManifestRow, DecodedClip]]
    ) -> dict[str, Sample]:
        """The samples of ``shard``'s decoded clips, by key, as :meth:`write` stores them.

        Public so that a clip made in memory (``pipelines.train_world``) becomes a sample exactly as a
        decoded file does."""
        return self.samples(dataset_dir, shard, [compact(row, clip) for row, clip in decoded])[0]

    def write(
        self, dataset_dir: str | Path, rows: Sequence[ManifestRow], decoded: DecodedShard,
        reuse: dict[str, Sample] | None = None,
    ) -> ShardResult:
        """Encode ``decoded`` (the CPU half's result for these ``rows``) and write the shard with its
        failures and marker. ``reuse`` maps keys to samples kept from an earlier attempt."""
        reuse = reuse or {}
        result = ShardResult(decoded.shard, retries=decoded.retries, decoder=decoded.where,
                             decode_span=(decoded.started, decoded.ended), decoder_node=decoded.node)  # fmt: skip
        start = time.perf_counter()
        encoded_before = self.prompts_encoded
        fresh, result.encode_batches = self.samples(dataset_dir, decoded.shard, decoded.clips)
        samples = {**reuse, **fresh}
        timings = {"decode": decoded.seconds, "encode": time.perf_counter() - start}

        failed = decoded.rejections()
        with ShardWriter(dataset_dir, decoded.shard, rows, max_failed_fraction=self.settings.max_failed_fraction) as w:
            for row in rows:  # manifest order
                if row.key in failed:
                    w.reject_error(row.key, failed[row.key])
                else:
                    w.add(samples[row.key])
            marker = w.finish(timings)
        result.ok, result.failed = marker.num_ok, marker.num_failed
        result.failures_by_reason = dict(marker.failures_by_reason)
        result.timings = dict(marker.timings)
        result.reused = len(reuse)
        result.prompts_encoded = self.prompts_encoded - encoded_before
        result.encoder = f"{socket.gethostname()}:{os.getpid()}"
        return result

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
        """Decode, encode and write ``shard`` in this process (the one-stage design). ``reuse`` maps keys
        to samples kept from an earlier attempt (``--retry-failed`` re-attempts only the recorded
        failures). ``crashed`` maps keys of clips that killed their worker to the number of crashes:
        they are recorded as ``crashes_worker``, not decoded again. ``before_clip`` runs before each clip
        is decoded (the Ray worker leaves a breadcrumb there, so that a crash can be blamed on its clip)."""
        reuse = reuse or {}
        decoded = self.decoder.decode_shard(shard, rows, media_root, frozenset(reuse), crashed, before_clip)
        return self.write(dataset_dir, rows, decoded, reuse)
