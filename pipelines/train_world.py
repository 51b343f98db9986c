"""A generated "training world": a small dataset whose audio is learnable from its video and prompt.

Each clip shows one object of one of K kinds on a dark background; every kind has its own colour and
its own sound (a tone of its own pitch). At a few event times the object flashes bright and grows,
and at exactly those times its tone sounds: a short decaying burst. So *when* a sound happens is in
the video only, and *which* sound it is, is in the prompt ("red square beeping") and in the colour;
in a mixed clip (self-augmentation: two objects side by side) only the prompt says which object's
events to follow. The world is built so that a trained model's flow-matching loss is lower with the
true conditions than with shuffled prompts or shuffled videos (the trainer's tests check that).

The clips are made in memory, deterministically from ``(seed, clip index)``, as decoded clips
(``preprocessing.media.DecodedClip``: 25 fps frames at the preset's size, 16 kHz audio peak-normalised
like a decoded file's), and become a dataset folder through the precompute job's own steps, minus
Ray and the media decoding: ``prepare_dataset`` (manifest, input failures, ``dataset.json``) from the
world's clip table, ``ShardProcessor`` (embedded encoders: prompts into the store, the empty prompt,
``encode_clips`` per shard), ``write_shard``, then ``record_text_features`` and
``refresh_sample_counts`` (samples and the train split's latent statistics). The folder therefore
has every file, field and dtype that ``selva precompute --preset tiny --encoders embedded`` writes;
only its clips never were media files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipelines.precompute import PrecomputeConfig, prepare_dataset
from pipelines.shard_processor import ShardProcessor
from pipelines.text_stage import record_text_features
from preprocessing.manifest import ManifestRow, rows_by_shard
from preprocessing.media import TRAIN_PEAK, DecodedClip, MediaInfo
from preprocessing.shard_writer import write_shard
from preprocessing.shards import refresh_sample_counts
from selva.audio.embedded_codec import EmbeddedCodecConfig
from selva.audio.mel import slaney_mel_filterbank
from selva.presets import get_preset

CLIP_TABLE = "clips.tsv"  # the world's input table, kept in the dataset folder (dataset.json names it)
# The clips are made in memory, never files: a URL root says so in dataset.json and spares the
# manifest step its existence checks (a URL is checked by the job that opens it; nothing opens these)
MEDIA_ROOT = "generated://pipelines.train_world"


@dataclass(frozen=True)
class ObjectKind:
    """One kind of object: its colour (RGB 0-255), its tone (Hz) and the words its prompt uses."""

    colour_name: str
    colour: tuple[int, int, int]
    pitch_hz: float
    sound: str

    @property
    def prompt(self) -> str:
        return f"{self.colour_name} square {self.sound}"


# Pitches an octave or more apart, so that each tone lies in its own bands of the 40-band embedded
# codec (~0.2-0.4 kHz wide there) and a burst never leaks into another kind's band.
KINDS = (
    ObjectKind("red", (230, 40, 40), 400.0, "beeping"),
    ObjectKind("green", (40, 210, 60), 900.0, "chirping"),
    ObjectKind("blue", (50, 80, 240), 1800.0, "ringing"),
    ObjectKind("yellow", (230, 210, 40), 3600.0, "whistling"),
)


@dataclass(frozen=True)
class WorldSpec:
    """What the world's clips look and sound like. Times are in video frames (25 fps) unless named _s."""

    kinds: tuple[ObjectKind, ...] = KINDS
    preset: str = "tiny"  # 2 s clips: 50 frames of 64 x 64, 32256 audio samples (63 latent frames)
    events: tuple[int, int] = (2, 4)  # events per clip, drawn in [lo, hi]
    min_gap: int = 10  # frames between two onsets (0.4 s: bursts and flashes never overlap)
    act_frames: int = 3  # frames the object stays bright and grown after an onset (120 ms)
    burst_s: float = 0.2  # length of a tone burst (~6 latent frames: timing is a visible part of the loss)
    decay_s: float = 0.08  # its exponential decay constant
    noise_rms: float = 0.0005  # a faint noise floor, so that no codec band is constant over the split
    # big and dim at rest, bright when acting: a flash changes most of the 16 16-pixel patches, so a random-init
    # backbone's features follow it clearly. Measured on fresh backbones (event effect on the pooled features,
    # norm over 64 dims): 0.3-0.5 with a 24-pixel square, 1.3-1.8 with 40; a generator trained on them showed
    # no video margin with 24 and a clear one with 40 (docs/benchmarks.md, "Learning on the training world")
    size: int = 40  # the object's side at rest, pixels; it grows by half while it acts (60 of 64 pixels)
    background: int = 16  # grey level of the dark background
    rest_level: float = 0.15  # the object's brightness at rest, a fraction of its colour
    seed: int = 0


@dataclass(frozen=True)
class WorldClip:
    """Clip ``index`` of a world: ``frames`` (T, S, S, 3) uint8 RGB, ``audio`` (N,) float32 at 16 kHz,
    peak ``TRAIN_PEAK``; ``onsets`` the event frames (sorted), ``kind`` an index into ``spec.kinds``."""

    index: int
    kind: int
    prompt: str
    onsets: tuple[int, ...]
    centre: tuple[int, int]  # (row, column) of the object, pixels
    frames: np.ndarray
    audio: np.ndarray


def kind_of(index: int, spec: WorldSpec) -> int:
    """Kinds in turn, so that every split of a few clips holds all of them equally often."""
    return index % len(spec.kinds)


def acting(onsets: tuple[int, ...], num_frames: int, spec: WorldSpec) -> np.ndarray:
    """(T,) bool: the frames in which the object flashes (each onset and the ``act_frames`` - 1 after it)."""
    mask = np.zeros(num_frames, np.bool_)
    for onset in onsets:
        mask[onset : onset + spec.act_frames] = True
    return mask


def tone_band(pitch_hz: float, num_mels: int = EmbeddedCodecConfig().num_mels) -> int:
    """The embedded codec's mel band that holds most of a tone at ``pitch_hz`` (its latent channel)."""
    c = EmbeddedCodecConfig(num_mels=num_mels)
    bank = slaney_mel_filterbank(c.sampling_rate, c.n_fft, c.num_mels, 0.0, c.fmax)
    return int(np.argmax(bank[:, round(pitch_hz * c.n_fft / c.sampling_rate)]))


def _onsets(rng: np.random.Generator, num_frames: int, spec: WorldSpec) -> tuple[int, ...]:
    # n onsets at least min_gap apart in [1, last]: spread the slack left by the gaps uniformly
    last = num_frames - spec.act_frames - 1  # the last flash ends inside the clip
    n = int(rng.integers(spec.events[0], spec.events[1] + 1))
    slack = last - 1 - (n - 1) * spec.min_gap
    if slack < 0:
        raise ValueError(f"{n} events {spec.min_gap} frames apart do not fit in {num_frames} frames")
    offsets = np.sort(rng.integers(0, slack + 1, size=n))
    return tuple(int(1 + o + i * spec.min_gap) for i, o in enumerate(offsets))


def world_clip(index: int, spec: WorldSpec) -> WorldClip:
    """Clip ``index`` of the world, a function of ``(spec.seed, index)`` only."""
    preset = get_preset(spec.preset)
    seq, size = preset.seq, preset.frame_size
    rng = np.random.default_rng([spec.seed, index])
    kind = kind_of(index, spec)
    obj = spec.kinds[kind]
    onsets = _onsets(rng, seq.sync_num_frames, spec)
    grown = spec.size * 3 // 2
    centre = tuple(int(c) for c in rng.integers(grown // 2 + 1, size - grown // 2 - 1, size=2))

    frames = np.full((seq.sync_num_frames, size, size, 3), spec.background, np.uint8)
    colour = np.asarray(obj.colour, np.float64)
    for t, on in enumerate(acting(onsets, seq.sync_num_frames, spec)):
        side = grown if on else spec.size
        top, left = centre[0] - side // 2, centre[1] - side // 2
        level = colour if on else colour * spec.rest_level
        frames[t, top : top + side, left : left + side] = np.round(level).astype(np.uint8)

    rate = seq.sampling_rate
    audio = rng.normal(0.0, spec.noise_rms, seq.num_audio_frames)  # beyond duration too: a decoder pads
    t = np.arange(round(spec.burst_s * rate)) / rate
    # 2 ms attack, 10 ms release: no click at either end, whose broadband energy would blur the bands
    ramp = np.minimum(1.0, np.minimum(t / 0.002, (spec.burst_s - t) / 0.01))
    burst = np.sin(2 * np.pi * obj.pitch_hz * t) * np.exp(-t / spec.decay_s) * ramp
    for onset in onsets:
        start = round(onset / seq.sync_frame_rate * rate)  # the burst starts with its flash's first frame
        end = min(len(audio), start + len(burst))  # a burst near the end is cut where the clip ends
        audio[start:end] += burst[: end - start]
    audio *= TRAIN_PEAK / np.max(np.abs(audio))  # what decode_clip does to a file's audio
    return WorldClip(index, kind, world_clip_prompt(index, spec), onsets, centre, frames, audio.astype(np.float32))


def as_decoded(clip: WorldClip, spec: WorldSpec) -> DecodedClip:
    """The clip as ``decode_clip`` would return it from a file holding exactly these frames and samples."""
    seq = get_preset(spec.preset).seq
    info = MediaInfo(
        name=f"world clip {clip.index}", format="generated", duration=seq.duration, size_bytes=None, streams=()
    )
    # the audio is made at its training peak, so that is its "raw" peak; nothing was padded
    return DecodedClip(clip.frames, clip.audio, float(TRAIN_PEAK), info, 0.0, seq.duration,
                       seq.sync_frame_rate, seq.sampling_rate, 0, 0)  # fmt: skip


def source_id(index: int) -> str:
    return f"world{index:06d}"


def world_clip_prompt(index: int, spec: WorldSpec) -> str:
    """Clip ``index``'s prompt, without rendering the clip."""
    return spec.kinds[kind_of(index, spec)].prompt


def index_of(source: str) -> int:
    """The clip index of a sample's ``source_id`` (its ``json``), to compare a sample with its clip."""
    return int(source.removeprefix("world"))


def write_train_world(
    root: str | Path,
    *,
    train: int = 16,
    val: int = 8,
    seed: int = 0,
    samples_per_shard: int = 4,
    spec: WorldSpec | None = None,
    processor: ShardProcessor | None = None,
) -> dict[str, list[str]]:
    """Write the world's dataset folder at ``root`` (new or empty); returns the sample keys per split,
    in clip-index order. Clips ``0 .. train-1`` are the train split, the next ``val`` the val split.

    ``seed`` sets the clips and the shard assignment (it replaces ``spec.seed``). ``processor``: an
    embedded ``ShardProcessor`` of the spec's preset to reuse (loading the text encoder costs seconds).
    """
    spec = replace(spec or WorldSpec(), seed=seed)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the world is written into a new folder")
    root.mkdir(parents=True, exist_ok=True)
    splits = {i: "train" if i < train else "val" for i in range(train + val)}
    lines = ["id\ttext\tsplit", *(f"{source_id(i)}\t{world_clip_prompt(i, spec)}\t{s}" for i, s in splits.items())]
    (root / CLIP_TABLE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = PrecomputeConfig(
        input=str(root / CLIP_TABLE), out=str(root), preset=spec.preset, encoders="embedded", seed=seed,
        samples_per_shard=samples_per_shard, media_root=MEDIA_ROOT, max_failed_fraction=0.0,
    )  # fmt: skip
    rows, _info = prepare_dataset(cfg)

    processor = processor or ShardProcessor(cfg.worker_settings())
    if (processor.settings.preset, processor.settings.encoders) != (cfg.preset, cfg.encoders):
        raise ValueError(f"processor has {processor.settings}; the world needs {cfg.preset} / {cfg.encoders}")
    # the text stage of the job: the empty prompt and every distinct prompt into the store, once
    processor.store_empty_prompt(root)
    processor.store_prompts(root, [row.text for row in rows])
    record_text_features(str(root))
    for shard, shard_rows in rows_by_shard(rows).items():
        _write_world_shard(root, shard, shard_rows, spec, processor)
    refresh_sample_counts(root)

    by_index = sorted(rows, key=lambda r: index_of(r.source_id))
    return {split: [r.key for r in by_index if r.split == split] for split in sorted(set(splits.values()))}


def _write_world_shard(
    root: Path, shard: str, rows: list[ManifestRow], spec: WorldSpec, processor: ShardProcessor
) -> None:
    started = time.perf_counter()
    decoded = [(row, as_decoded(world_clip(index_of(row.source_id), spec), spec)) for row in rows]
    generated = time.perf_counter()
    samples = processor.encode_clips(root, shard, decoded)
    timings = {"decode": generated - started, "encode": time.perf_counter() - generated}  # as process() names them
    write_shard(root, shard, rows, samples.values(), timings=timings)
