"""What ``selva evaluate`` compares: pairing generated files with references, prompts, audio reading.

Two reference layouts (docs/evaluate.md):

* **benchmark** (``selva benchmark build``, and the released VGG-MonoAudio set):
  ``REF/<subset>/target_audio/<name>.(flac|wav)``, ``REF/<subset>/mixed/<name>.mp4`` and
  ``REF/<subset>/metadata.csv`` (``file_name,label`` [, ``negative``, ``placement``, ...]);
  generated files are ``GEN/<subset>/<name>.(flac|wav)`` and pair as ``<subset>/<name>``.
* **flat**: ``REF/<name>.(flac|wav)`` pairs with ``GEN/<name>.(flac|wav)``; prompts come from a
  ``file_name,label`` table (``--metadata``).

Unlike av-benchmark, which drops unpaired names and replaces an unreadable file by the next one,
every unpaired, duplicated or unreadable file is an error, and all of them are listed in one.

Audio is read as av-benchmark's ``AudioDataset`` reads it (there with torchaudio, here with PyAV):
mean over channels, the waveform's mean removed (before resampling), resampled with
``torchaudio.functional.resample`` at its defaults (sinc_interp_hann, width 6, rolloff 0.99), and
truncated to ``duration`` seconds; a shorter file is not padded.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torchaudio.functional as AF

from training.benchmark_plan import PLACEMENTS
from training.benchmark_read import AUDIO_SUFFIXES, BenchmarkError, BenchmarkItem, read_benchmark

# audio that av-benchmark would not read either: listed as a problem, never skipped silently
OTHER_AUDIO_SUFFIXES = (".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".wma")


class EvaluationError(ValueError):
    """A bad input to ``selva evaluate``: the first line says what, the following lines list every
    file concerned."""


@dataclass(frozen=True)
class EvalItem:
    """One generated file and its reference."""

    key: str  # "<name>" (flat) or "<subset>/<name>" (benchmark)
    generated: Path
    reference: Path
    prompt: str | None  # the text the generation was asked for (CLAP score); None if unknown
    subset: str | None  # benchmark subset ("intra_class", "inter_class"); None for a flat reference
    placement: str | None  # "left" | "right" (where the target sits in the mixed video); None: unknown
    video: Path | None  # the (mixed) input video, where known


@dataclass(frozen=True)
class Pairing:
    layout: str  # "benchmark" | "flat"
    items: list[EvalItem]
    placement_known: bool  # the metadata had a placement column (benchmark layout)
    seconds: dict[Path, float]  # decoded length of every paired file (empty if not checked)


def is_benchmark_root(reference: Path) -> bool:
    """A benchmark root has at least one ``<subset>/metadata.csv`` next to ``<subset>/target_audio/``."""
    return any((d / "metadata.csv").is_file() and (d / "target_audio").is_dir()
               for d in reference.iterdir() if d.is_dir())


def read_metadata(path: Path) -> dict[str, dict[str, str]]:
    """``file_name,label`` table -> {file stem: row}. ``file_name`` may carry an extension (the
    released metadata names the mp4). A duplicated stem or a missing column is an error."""
    with open(path, newline="", encoding="utf-8-sig") as fh:  # a spreadsheet export may start with a BOM
        first = fh.readline()
        fh.seek(0)
        reader = csv.DictReader(fh, delimiter="\t" if "\t" in first else ",")  # a clip table is often TSV
        fields = set(reader.fieldnames or ())
        name_column = "file_name" if "file_name" in fields else "id"  # a clip table's id names its outputs
        missing = {name_column, "label"} - fields
        if missing:
            raise EvaluationError(f"{path}: metadata needs the columns file_name (or id) and label; "
                                  f"missing {', '.join(sorted(missing))} (columns: {', '.join(sorted(fields))})")
        rows: dict[str, dict[str, str]] = {}
        dupes = []
        for line, row in enumerate(reader, start=2):
            stem = Path((row[name_column] or "").strip()).stem
            if stem in rows:
                dupes.append(f"  {path}:{line}: {row[name_column]} repeats an earlier row")
            rows[stem] = {k: (v or "").strip() for k, v in row.items() if k}
    if dupes:
        raise EvaluationError("\n".join([f"{path}: {len(dupes)} duplicated file_name(s):", *dupes]))
    return rows


def _audio_files(folder: Path, problems: list[str], seen: list[Path]) -> dict[str, Path]:
    """{stem: path} of the audio files in ``folder`` (all of them also appended to ``seen``); a stem
    with two files (x.wav and x.flac) is a problem."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        problems.append(f"  {folder}: no such folder")
        return found
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in OTHER_AUDIO_SUFFIXES:
            problems.append(f"  {path}: {path.suffix} is not read (av-benchmark reads .flac and .wav): convert it")
            continue
        if path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file():
            continue
        seen.append(path)
        if path.stem in found:
            problems.append(f"  {path}: a second file for {path.stem} (also {found[path.stem].name})")
            continue
        found[path.stem] = path
    return found


def pair_files(generated: str | os.PathLike, reference: str | os.PathLike, metadata: str | os.PathLike | None = None,
               videos: str | os.PathLike | None = None, check_audio: bool = True) -> Pairing:
    """Pair every generated file with its reference (module docstring) and, with ``check_audio``,
    decode every audio file found (paired or not). Raises one EvaluationError that lists every
    unpaired, duplicated and unreadable file when there is any, and when nothing pairs at all."""
    gen_root, ref_root = Path(generated), Path(reference)
    for root, what in ((gen_root, "--generated"), (ref_root, "--reference")):
        if not root.is_dir():
            raise EvaluationError(f"{what} {root} is not a folder")
    problems: list[str] = []
    seen: list[Path] = []
    items: list[EvalItem] = []
    if is_benchmark_root(ref_root):
        layout = "benchmark"
        subsets = sorted(d for d in ref_root.iterdir() if (d / "metadata.csv").is_file())
        try:  # the metadata is read as generate --manifest reads it: one reader, one meaning of each column
            rows = read_benchmark(ref_root, require_videos=False)
        except BenchmarkError as err:
            raise EvaluationError(str(err)) from None
        for sub in subsets:
            items += _benchmark_subset(sub, [r for r in rows if r.subset == sub.name], gen_root / sub.name,
                                       problems, seen)
        placement_known = any(it.placement is not None for it in items)
        names = {s.name for s in subsets}
        # generate's failures/ and other bookkeeping folders hold no audio: only audio folders count
        stray = sorted(d.name for d in gen_root.iterdir() if d.is_dir() and d.name not in names
                       and any(p.suffix.lower() in AUDIO_SUFFIXES for p in d.iterdir()))
        stray_files = sorted(p.name for p in gen_root.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        problems += [f"  {gen_root / name}: audio in a folder that is not a subset of the reference" for name in stray]
        problems += [f"  {gen_root / name}: audio outside a subset folder (expected GEN/<subset>/<name>)"
                     for name in stray_files]
    else:
        layout, placement_known = "flat", False
        meta = read_metadata(Path(metadata)) if metadata else {}
        refs, gens = _audio_files(ref_root, problems, seen), _audio_files(gen_root, problems, seen)
        for root in (ref_root, gen_root):  # a flat layout pairs top-level files: audio deeper would be dropped
            problems += [f"  {d}: audio in a subfolder (a flat layout pairs only the files directly in {root})"
                         for d in sorted(root.iterdir()) if d.is_dir() and any(
                             p.suffix.lower() in AUDIO_SUFFIXES + OTHER_AUDIO_SUFFIXES for p in d.rglob("*"))]
        video_root = Path(videos) if videos else None
        items = _pair(refs, gens, "", problems, meta, None,
                      lambda stem: _existing(video_root / f"{stem}.mp4") if video_root else None)
    seconds, unreadable = probe_audio(seen) if check_audio else ({}, [])
    if problems or unreadable:
        lines = []
        if problems:
            lines += [f"{len(problems)} file problem(s) between --generated {gen_root} and --reference {ref_root} "
                      "(every file must pair by name):", *problems]
        if unreadable:
            lines += [f"{len(unreadable)} unreadable audio file(s):", *unreadable]
        raise EvaluationError("\n".join(lines))
    if not items:
        raise EvaluationError(f"no audio files (.flac, .wav) to pair in --generated {gen_root} and "
                              f"--reference {ref_root}")
    return Pairing(layout, items, placement_known, seconds)


def _benchmark_subset(sub: Path, rows: list[BenchmarkItem], gen_dir: Path, problems: list[str],
                      seen: list[Path]) -> list[EvalItem]:
    """The items of one benchmark subset, driven by its metadata rows (``read_benchmark``): each row's
    composite name pairs ``GEN/<subset>/<name>`` with its reference, ``target_audio/<name>`` or
    ``target_audio/<target id>`` (both placements of a pair then share one reference). A subset with no
    rows (``benchmark build`` without a category column leaves intra_class empty) has nothing to pair:
    neither folder is required, but generated audio there is still a problem."""
    if not rows:
        if gen_dir.is_dir():
            problems += [f"  {p}: not in {sub / 'metadata.csv'} (an empty subset)" for p in sorted(gen_dir.iterdir())
                         if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
        return []
    _audio_files(sub / "target_audio", problems, seen)  # every reference is decoded, and x.wav + x.flac is a problem
    gens = _audio_files(gen_dir, problems, seen)
    items = []
    meta = sub / "metadata.csv"
    for row in sorted(rows, key=lambda r: r.name):
        if row.target_audio is None:
            problems.append(f"  {meta}: {row.name} has no reference audio in {sub / 'target_audio'}")
        if row.name not in gens:
            problems.append(f"  {meta}: {row.name} has no generated audio {gen_dir / row.name}.(flac|wav)")
        if row.target_audio is not None and row.name in gens:
            items.append(EvalItem(key=f"{sub.name}/{row.name}", generated=gens[row.name], reference=row.target_audio,
                                  prompt=row.label, subset=sub.name, placement=row.placement, video=row.video))
    for stem in sorted(set(gens) - {r.name for r in rows}):
        problems.append(f"  {gens[stem]}: not in {sub / 'metadata.csv'}")
    return items


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _pair(refs: dict[str, Path], gens: dict[str, Path], prefix: str, problems: list[str],
          meta: dict[str, dict[str, str]], subset: str | None, video_of) -> list[EvalItem]:
    for stem in sorted(set(gens) - set(refs)):
        problems.append(f"  {gens[stem]}: no reference {prefix}{stem}")
    for stem in sorted(set(refs) - set(gens)):
        problems.append(f"  {refs[stem]}: no generated {prefix}{stem}")
    items = []
    for stem in sorted(set(refs) & set(gens)):
        row = meta.get(stem, {})
        placement = row.get("placement") or None
        if placement is not None and placement not in PLACEMENTS:
            problems.append(f"  {prefix}{stem}: placement {placement!r} is not left or right")
        items.append(EvalItem(key=f"{prefix}{stem}", generated=gens[stem], reference=refs[stem],
                              prompt=row.get("label") or None, subset=subset, placement=placement,
                              video=video_of(stem)))
    return items


def decode_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a whole audio file -> (float32 (C, N) in [-1, 1], sample rate), as torchaudio.load
    does (integer PCM scaled by 2^(bits-1)). Raises ValueError for a file with no audio samples."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        # float planar keeps every channel; the resampler only converts the sample format here
        resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=stream.rate)
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
        rate = stream.rate
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise ValueError("no audio samples")
    audio = np.concatenate(chunks, axis=1).astype(np.float32)
    if not np.isfinite(audio).all():
        raise ValueError("non-finite samples")
    return audio, rate


def prepare(audio: np.ndarray, rate: int, target_rate: int, duration_s: float | None) -> np.ndarray:
    """(C, N) at ``rate`` -> mono (T,) float32 at ``target_rate`` the av-benchmark way: channel mean,
    mean removal, resampling (torchaudio defaults), truncation to ``int(target_rate * duration_s)``."""
    mono = audio.mean(axis=0, dtype=np.float64).astype(np.float32)
    mono = mono - mono.mean()  # DC removal over the whole file, before resampling, as av-benchmark
    wave = torch.from_numpy(mono)
    if rate != target_rate:
        wave = AF.resample(wave, rate, target_rate)
    if duration_s is not None:
        wave = wave[: int(target_rate * duration_s)]
    return wave.numpy()


def load_audio(path: str | os.PathLike, target_rate: int, duration_s: float | None) -> np.ndarray:
    """:func:`decode_audio` then :func:`prepare`: mono float32 (T,) at ``target_rate``."""
    audio, rate = decode_audio(path)
    return prepare(audio, rate, target_rate, duration_s)


def probe_audio(paths: Iterable[Path]) -> tuple[dict[Path, float], list[str]]:
    """Decode every file once: ({path: seconds} of the readable ones, one line per unreadable file
    with its reason)."""
    seconds: dict[Path, float] = {}
    bad = []
    for path in paths:
        try:
            audio, rate = decode_audio(path)
        except (av.error.FFmpegError, ValueError, OSError) as err:
            bad.append(f"  {path}: {' '.join(str(err).split()) or type(err).__name__}")
            continue
        seconds[path] = audio.shape[1] / rate
    return seconds, bad


def groups(pairing: Pairing) -> dict[str, list[int]]:
    """Report groups -> item indices: ``overall``; per ``subset/<name>``; per ``placement/<side>``
    (``placement/unknown`` for items whose metadata has no placement, when others have one)."""
    out = {"overall": list(range(len(pairing.items)))}
    for i, item in enumerate(pairing.items):
        if item.subset is not None:
            out.setdefault(f"subset/{item.subset}", []).append(i)
    if pairing.placement_known:
        for i, item in enumerate(pairing.items):
            out.setdefault(f"placement/{item.placement or 'unknown'}", []).append(i)
    return out


def lengths_summary(seconds: Iterable[float]) -> dict[str, float]:
    values = list(seconds)
    return {"min_s": min(values), "max_s": max(values), "mean_s": math.fsum(values) / len(values)}
