"""Generation: a video span and a text prompt -> the prompted object's sound (``selva generate``).

The library half (this module) loads a checkpoint with the encoders it was trained with, decodes the
video like precompute (sync frames at 25 fps squashed to the preset's frame size; the audio stream
is neither needed nor read: a silent or audio-less video is the normal input here), runs TextSynch,
the Euler sampler with classifier-free guidance and the codec, and writes the outputs. The official
inference is followed step for step (``selva.sampling``): the CLIP visual stream is the learned empty
sequence, and a negative prompt replaces the empty text in the unconditional branch.

Durations: any span of a whole number of 25 fps frames (a multiple of 0.04 s) of at least 16 frames
(one Synchformer segment, 0.64 s); the generator's sequence lengths follow it (MMAudio's
``SequenceConfig`` at the preset's audio rate). The codec returns ``num_audio_frames`` samples, slightly
more than ``d x rate`` (whole latents); the waveform is trimmed to exactly ``round(d x rate)``, with rate
16,000 Hz for the 16 kHz presets and 44,100 Hz for the 44.1 kHz ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preprocessing.compact import encode_flac
from preprocessing.media import DecodedClip, decode_clip
from selva.encoders import FrozenEncoders, build_encoders, encoder_family
from selva.generator import Generator
from selva.presets import ModelPreset, get_preset
from selva.sampling import generate_latents
from selva.sequence import SequenceConfig
from selva.textsynch import TextSynch
from training.export import ExportPathError, load_export

MIN_FRAMES = 16  # one Synchformer segment
SLUG_CHARS = 40


class GenerationError(ValueError):
    """A bad input to generation (checkpoint, video, prompt, span): the message names it."""


@dataclass
class GenerationModel:
    """A checkpoint ready to generate: its preset, frozen encoders and the two SELVA modules (eval)."""

    preset: ModelPreset
    encoders: FrozenEncoders
    textsynch: TextSynch
    generator: Generator
    source: Path
    kind: str  # "export" (ours) or "official" (a release weights folder)
    # the video features the generator was trained on: TextSynch's text-conditioned ones (SELVA), or the
    # backbone's own without text (a ``pretrain`` export or the ``text_in_encoder: false`` ablation, MMAudio-style)
    text_in_encoder: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    video: Path
    prompt: str
    negative_prompt: str | None = None
    start: float = 0.0
    duration: float | None = None  # None: the preset's clip length
    steps: int = 25
    cfg: float = 4.5
    seed: int = 0


@dataclass
class Generated:
    """``audio`` (N,) float32 in the codec's range (N = round(duration x rate)), at ``sample_rate``."""

    audio: np.ndarray
    sample_rate: int
    clip: DecodedClip
    duration: float


def load_model(checkpoint: str | os.PathLike, *, weights: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", preset: str | None = None) -> GenerationModel:
    """One of our exports (``final/``: preset and encoder family from its ``export.json``) or an official
    weights folder (official encoders from the same folder; docs/weights.md) for ``preset`` (default
    small_16k; small_44k, medium_44k or large_44k for the 44.1 kHz release). ``weights``: the official
    encoders' folder for an export trained on them. Raises GenerationError, also for a ``preset`` that is
    not the export's own."""
    path = Path(checkpoint)
    if preset is not None:
        try:
            get_preset(preset)
        except KeyError as err:
            raise GenerationError(str(err.args[0])) from None
    record_file = path / "export.json"
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            preset_of_export = get_preset(str(record["preset"]))
        except (ValueError, KeyError, TypeError) as err:
            raise GenerationError(f"{record_file}: not an export record this version reads ({err})") from err
        if "encoders" not in record:
            raise GenerationError(f"{record_file}: the export does not say which encoders it was trained with "
                                  f"(exported before generation existed): export it again with this version")
        try:
            family = encoder_family(record["encoders"])
        except ValueError as err:
            raise GenerationError(f"{record_file}: {err}") from err
        if preset is not None and preset != preset_of_export.name:
            raise GenerationError(f"{path} is a {preset_of_export.name} export; --preset {preset} does not fit it "
                                  f"(leave --preset out for an export)")
        preset_obj, kind, weights_dir = preset_of_export, "export", weights
        if family == "official" and weights_dir is None:
            raise GenerationError(f"{path} was trained on the official encoders: give their folder with --weights "
                                  f"DIR (docs/weights.md)")
    else:
        preset_obj, family, kind = get_preset(preset or "small_16k"), "official", "official"
        weights_dir = weights or path
        if not preset_obj.released:
            raise GenerationError(f"--preset {preset_obj.name} has no released weights; an official folder holds "
                                  f"small_16k, small_44k, medium_44k or large_44k")
        from selva.weights import GENERATE_ROLES, MissingWeightsError, official_path, require

        models = ("selva_generator", "textsynch")  # in --checkpoint; the encoders in --weights when given
        # a weights folder (one of its model files is there): every file of the job checked, each missing one
        # named, before any is loaded; a folder of neither kind gets load_export's one line below
        if any(official_path(path, role, preset_obj.name).is_file() for role in models):
            problems = []
            for folder, roles in ((path, models), (weights_dir, [r for r in GENERATE_ROLES if r not in models])):
                try:
                    require(folder, roles, preset_obj.name)
                except MissingWeightsError as err:
                    problems.append(str(err))
            if problems:
                raise GenerationError("\n".join(problems))
    try:
        textsynch, generator = load_export(path, preset_obj)
    except ExportPathError as err:
        raise GenerationError(str(err)) from err
    encoders = build_encoders(family, preset_obj, weights_dir, device)
    text_in_encoder = kind == "official" or trained_with_text_in_encoder(path / "config.yaml")
    return GenerationModel(preset_obj, encoders, textsynch.to(device).eval(), generator.to(device).eval(), path, kind,
                           text_in_encoder)


def trained_with_text_in_encoder(config_file: Path) -> bool:
    """Whether an export's generator was trained on text-conditioned video features: the job's resolved
    config (``final/config.yaml``) says so unless its stage was ``pretrain`` (text never enters the video
    encoder there) or it set ``text_in_encoder: false`` (the MMAudio-style ablation). Generating such an
    export through TextSynch's cross blocks would feed it features it never saw (untrained [SUP] tokens and
    cross attention for a pretrain export). A missing config file means the default (True)."""
    import yaml

    if not config_file.is_file():
        return True
    try:
        config = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise GenerationError(f"{config_file}: not readable YAML ({err})") from err
    if not isinstance(config, dict):
        raise GenerationError(f"{config_file}: not a training config (a mapping)")
    return config.get("stage") != "pretrain" and bool(config.get("text_in_encoder", True))


def check_duration(duration: float) -> int:
    """The number of 25 fps frames of a valid span; GenerationError otherwise."""
    frames = duration * 25
    if not np.isfinite(frames) or abs(frames - round(frames)) > 1e-6 or round(frames) < MIN_FRAMES:
        raise GenerationError(f"--duration {duration:g}: a span must be a whole number of 25 fps frames (a multiple "
                              f"of 0.04 s) and at least {MIN_FRAMES} frames ({MIN_FRAMES / 25:g} s)")
    return round(frames)


def check_prompt(prompt: str, what: str = "--prompt") -> str:
    text = " ".join(str(prompt).split())
    if not text:
        raise GenerationError(f"{what} is empty: say which sound to generate (e.g. 'a dog barking')")
    return text


def decode_video(model: GenerationModel, request: GenerationRequest, duration: float) -> DecodedClip:
    """The span's sync frames (T, S, S, 3) uint8; ``Rejected`` (names the file) for an unusable video."""
    return decode_clip(str(request.video), duration=duration, frame_size=model.preset.frame_size,
                       start=request.start, with_audio=False)


def video_tensor(clip: DecodedClip) -> torch.Tensor:
    """(T, S, S, 3) uint8 -> (1, T, 3, S, S) float in [-1, 1], normalised as training does (selva.mixing)."""
    return torch.from_numpy(clip.frames).permute(0, 3, 1, 2)[None].float().div(127.5).sub(1.0).clamp(-1.0, 1.0)


def initial_noise(model: GenerationModel, seq: SequenceConfig, seed: int) -> torch.Tensor:
    """(1, latent_seq_len, latent_dim) standard normal noise from ``seed`` alone (a private generator:
    the result depends on nothing else the process drew)."""
    rng = torch.Generator().manual_seed(int(seed))
    return torch.randn(1, seq.latent_seq_len, model.preset.generator.latent_dim, generator=rng)


def generate(model: GenerationModel, request: GenerationRequest) -> Generated:
    """Run one request. Raises GenerationError (prompt, span) or ``Rejected`` (the video)."""
    return generate_batch(model, [request])[0]


def item_seed(seed: int, name: str) -> int:
    """Batch mode's per-item seed: from the run's seed and the item's name only, so an item's noise does
    not depend on the batch it lands in, the rank that runs it or how often the job was resumed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _checked(model: GenerationModel, request: GenerationRequest) -> tuple[str, str | None, float]:
    prompt = check_prompt(request.prompt)
    negative = request.negative_prompt
    if negative is not None:
        negative = check_prompt(negative, "--negative-prompt")
    duration = float(request.duration if request.duration is not None else model.preset.duration)
    check_duration(duration)
    if not (np.isfinite(request.start) and request.start >= 0):
        raise GenerationError(f"--start {request.start:g}: the span's start must be a number of seconds >= 0")
    if request.steps < 1 or not np.isfinite(request.cfg):
        raise GenerationError(f"--steps must be >= 1 and --cfg finite (got {request.steps}, {request.cfg})")
    return prompt, negative, duration


def generate_batch(model: GenerationModel, requests: list[GenerationRequest]) -> list[Generated]:
    """Requests of one duration, steps and cfg in one sampler call (B clips at once); each item's noise
    comes from its own ``seed``. Raises GenerationError / ``Rejected`` naming the bad input."""
    checked = [_checked(model, r) for r in requests]
    durations = {d for _, _, d in checked}
    settings = {(r.steps, r.cfg) for r in requests}
    if len(durations) != 1 or len(settings) != 1:
        raise GenerationError("a batch needs one duration, one --steps and one --cfg")
    duration, (steps, cfg) = durations.pop(), settings.pop()
    clips = [decode_video(model, r, duration) for r in requests]
    seq = model.preset.sequence(duration)
    model.generator.update_seq_lengths(seq)
    prompts = [p for p, _, _ in checked]
    with torch.inference_mode():
        t5 = model.encoders.t5.encode(prompts)
        clip_text = model.encoders.clip.encode(prompts).tokens
        negative_text = None
        if any(n is not None for _, n, _ in checked):
            # a row without a negative prompt keeps the empty text, as the unconditional branch has it
            empty = model.generator.empty_string_sequence(1)[0]
            negative_text = torch.stack([
                model.encoders.clip.encode([n]).tokens[0].to(empty.dtype) if n is not None else empty
                for _, n, _ in checked
            ])
        noise = torch.cat([initial_noise(model, seq, r.seed) for r in requests])
        video = torch.cat([video_tensor(c) for c in clips])
        result = generate_latents(model.textsynch, model.generator, video, t5.tokens, t5.mask, clip_text, noise,
                                  steps=steps, cfg_strength=cfg, negative_text=negative_text,
                                  text_in_encoder=model.text_in_encoder)
        waves = model.encoders.codec.decode(result.latent).float().numpy()
    rate = model.encoders.codec.sampling_rate
    samples = round(duration * rate)
    return [Generated(np.ascontiguousarray(w[:samples], dtype=np.float32), rate, c, duration)
            for w, c in zip(waves, clips, strict=True)]


def default_name(video: str | os.PathLike, prompt: str, start: float = 0.0, duration: float | None = None) -> str:
    """``<video id>-<prompt slug>-<6 hex>``, the hex of the prompt and, when not the default (start 0, the
    preset's length), the span: two prompts or two spans of one video never collide, even when their
    slugs do (case, punctuation, length)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:SLUG_CHARS].rstrip("-") or "prompt"
    key = prompt if (start == 0 and duration is None) else f"{prompt}\0{float(start)!r}\0{duration!r}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:6]
    return f"{Path(video).stem}-{slug}-{digest}"


def check_name(name: str) -> str:
    """An output file stem: no folder parts (it must stay inside --out), not empty, no leading dot."""
    if not name or name != Path(name).name or name.startswith(".") or "\\" in name:
        raise GenerationError(f"--name {name!r}: give a file stem without folders or a leading dot (outputs go "
                              "to --out)")
    return name


def audio_for_files(audio: np.ndarray) -> tuple[np.ndarray, int]:
    """The waveform clipped to [-1, 1] (what a 16-bit file holds) and how many samples were clipped."""
    clipped = int(np.count_nonzero(np.abs(audio) > 1.0))
    return np.clip(audio, -1.0, 1.0), clipped


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@dataclass(frozen=True)
class Written:
    flac: Path
    mp4: Path
    png: Path
    video_copied: bool
    reencode_reason: str
    clipped_samples: int


def write_outputs(generated: Generated, request: GenerationRequest, out_dir: str | os.PathLike, name: str) -> Written:
    """``NAME.png`` (log-mel spectrogram), ``NAME.mp4`` (the input's span with the new track) and, last,
    ``NAME.flac``: its presence means the item is complete (batch mode skips it on a rerun)."""
    from preprocessing.mux import mux_span_with_audio
    from training.validation import log_mel_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    audio, clipped = audio_for_files(generated.audio)
    png = out / f"{name}.png"
    image = log_mel_image(audio, generated.sample_rate)
    tmp = png.with_name(png.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(png)
    muxed = mux_span_with_audio(request.video, out / f"{name}.mp4", start=request.start, duration=generated.duration,
                                audio=audio, sample_rate=generated.sample_rate)
    flac = out / f"{name}.flac"
    _write_atomic(flac, encode_flac(audio, generated.sample_rate))
    return Written(flac, muxed.path, png, muxed.video_copied, muxed.reason, clipped)
