"""``selva synth``: the training world (``pipelines.train_world``) as real media files, and its test set.

The proof that selection works (issue 13, ``docs/benchmarks.md``) runs the real pipeline on a small
world whose right answer is known: each clip shows one object of one of K kinds that flashes at
random times and sounds (its own tone) exactly then. Here those clips become what a user would
bring: mp4 files with an H.264 picture and an AAC track, and a clip table. Nothing downstream knows
they are synthetic.

Output::

    DIR/clips/<id>.mp4        training clips (train and val split)
    DIR/clips.tsv             id, label, path, split, kind, pitch_hz, onsets (event times, s, comma-separated)
    DIR/test/clips/<id>.mp4   held-out clips (other indices of the same world: never trained on)
    DIR/test/clips.tsv        the same columns
    DIR/test/benchmark/       composites of two held-out clips of different kinds side by side, in
                              the layout of ``selva benchmark build`` (inter_class only: the world
                              has no categories), both placements, each composite asked for each of
                              its two objects (``reciprocal``), the target's clean track as reference
    DIR/synth.json            the options; a rerun with other options refuses the folder

Clip ``i`` is a function of ``(seed, i)`` only; training clips are ``0 .. clips-1``, held-out clips
the next ``test_clips``. Every file is written to a temporary name and renamed, the tables last, so a
killed run leaves no half file and a rerun rewrites the same bytes (bit-exact encoders). A rerun of a
complete run whose files are all there (``synth.json`` lists them with their sizes) writes nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.train_world import WorldClip, WorldSpec, source_id, world_clip, world_clip_prompt
from preprocessing.mux import encode_av_mp4
from preprocessing.shards import atomic_target, write_json_atomic
from selva.presets import get_preset


class SynthError(ValueError):
    """Impossible options, or an output folder that is not this world's."""


TABLE_COLUMNS = ("id", "label", "path", "split", "kind", "pitch_hz", "onsets")


@dataclass(frozen=True)
class SynthOptions:
    clips: int = 64  # training clips (train + val)
    val_fraction: float = 0.25  # the last quarter of them is the val split
    test_clips: int = 16  # held-out clips for the composite test set
    partners: int = 1  # partners per held-out clip (each pair is asked for both objects, both placements)
    seed: int = 0
    preset: str = "tiny"  # sets the clip length, frame size and frame rate


def event_times(clip: WorldClip, spec: WorldSpec) -> list[float]:
    """The clip's event onsets in seconds: flash frame / frame rate (the burst starts with that frame)."""
    rate = get_preset(spec.preset).seq.sync_frame_rate
    return [onset / rate for onset in clip.onsets]


def _write_clip(path: Path, clip: WorldClip, spec: WorldSpec) -> None:
    seq = get_preset(spec.preset).seq
    data = encode_av_mp4(clip.frames, clip.audio[: round(seq.duration * seq.sampling_rate)],
                         fps=round(seq.sync_frame_rate), sample_rate=seq.sampling_rate)  # fmt: skip
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def _write_table(path: Path, rows: list[tuple]) -> None:
    lines = ["\t".join(TABLE_COLUMNS), *("\t".join(str(v) for v in row) for row in rows)]
    with atomic_target(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_clips(folder: Path, indices: range, splits: dict[int, str], spec: WorldSpec) -> Path:
    """Write ``folder/clips/<id>.mp4`` for each index and ``folder/clips.tsv``; returns the table."""
    rows = []
    for index in indices:
        clip = world_clip(index, spec)
        name = source_id(index)
        _write_clip(folder / "clips" / f"{name}.mp4", clip, spec)
        onsets = ",".join(f"{t:.3f}" for t in event_times(clip, spec))
        rows.append((name, world_clip_prompt(index, spec), f"clips/{name}.mp4", splits[index], clip.kind,
                     spec.kinds[clip.kind].pitch_hz, onsets))
    table = folder / "clips.tsv"
    _write_table(table, rows)
    return table


def write_synth(out: str | Path, options: SynthOptions = SynthOptions(), spec: WorldSpec | None = None) -> dict:
    """Write the world's clips, tables and test benchmark under ``out`` (module doc); returns a summary
    ``{"clips": n, "test_clips": n, "composites": n}``. Raises ``SynthError`` for impossible options
    or a folder written with other options."""
    from training.benchmark_build import BuildOptions, build_benchmark

    if options.clips < 2 or options.test_clips < 2 or not 0 < options.val_fraction < 1:
        raise SynthError(f"need clips >= 2, test_clips >= 2 and 0 < val_fraction < 1; got {options}")
    try:  # before anything is written: a folder must never record options that cannot run
        get_preset(options.preset)
    except KeyError as err:
        raise SynthError(str(err.args[0])) from None
    spec = replace(spec or WorldSpec(), seed=options.seed, preset=options.preset)
    out = Path(out)
    record = {"options": asdict(options), "spec": asdict(spec)}
    marker = out / "synth.json"
    if marker.is_file():
        before = json.loads(marker.read_text())
        if before["options"] != record["options"]:
            raise SynthError(f"{out}: written with other options ({marker}); synth into a new folder")
        if before.get("status") == "complete" and _intact(out, before.get("files", {})):
            return {k: before[k] for k in ("clips", "test_clips", "composites")}  # nothing to redo
    elif out.exists() and any(out.iterdir()):
        raise SynthError(f"{out}: exists, is not empty and holds no synth.json: not writing into it")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {**record, "status": "writing"})

    val = max(1, round(options.clips * options.val_fraction))
    splits = {i: "train" if i < options.clips - val else "val" for i in range(options.clips)}
    _write_clips(out, range(options.clips), splits, spec)
    held_out = range(options.clips, options.clips + options.test_clips)
    test_table = _write_clips(out / "test", held_out, dict.fromkeys(held_out, "test"), spec)
    preset = get_preset(spec.preset)
    built = build_benchmark(test_table, out / "test" / "benchmark",
                            BuildOptions(duration=preset.duration, seed=options.seed, partners=options.partners,
                                         frame_size=preset.frame_size, reciprocal=True,
                                         sample_rate=preset.sampling_rate),  # references at the model's rate
                            log=lambda line: None)  # fmt: skip
    if built.rejected:  # the world's clips are all good: a rejection is a defect here, not bad data
        raise RuntimeError(f"benchmark build rejected synthetic clips: {built.rejected[0]}")
    summary = {"clips": options.clips, "test_clips": options.test_clips,
               "composites": sum(built.items.values())}  # fmt: skip
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file() and p != marker}  # fmt: skip
    write_json_atomic(marker, {**record, "status": "complete", **summary, "files": files})
    return summary


def _intact(out: Path, files: dict[str, int]) -> bool:
    """Every file a complete run wrote is there with its size (a rerun then has nothing to do; else it
    rewrites everything, which gives the same bytes)."""
    return bool(files) and all((out / name).is_file() and (out / name).stat().st_size == size
                               for name, size in files.items())


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "synth", help="write the synthetic world's clips (mp4 + table) and its composite test set",
        description="Single-source clips of K=4 object kinds (colour + tone) that flash and sound at random "
        "times, as mp4 files with a clip table (id, label, path, split, kind, pitch_hz, onsets), plus held-out "
        "clips and their composites in the benchmark layout (test/benchmark). The input of the synthetic "
        "proof (docs/benchmarks.md); selva precompute reads DIR/clips.tsv like any clip table.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (new, or one written with the same options)")
    p.add_argument("--clips", type=int, default=SynthOptions.clips,
                   help=f"training clips (default {SynthOptions.clips})")
    p.add_argument("--test-clips", type=int, default=SynthOptions.test_clips,
                   help=f"held-out clips for the composites (default {SynthOptions.test_clips})")
    p.add_argument("--partners", type=int, default=SynthOptions.partners,
                   help="partners per held-out clip (each pair: both objects asked, both placements)")
    p.add_argument("--seed", type=int, default=0, help="the world's seed (clips are a function of seed and index)")
    p.add_argument("--preset", default=SynthOptions.preset, help="model preset: clip length and frame size")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    options = SynthOptions(clips=args.clips, test_clips=args.test_clips, partners=args.partners, seed=args.seed,
                           preset=args.preset)
    summary = write_synth(args.out, options)
    print(f"{args.out}: {summary['clips']} clips (clips.tsv), {summary['test_clips']} held-out clips, "
          f"{summary['composites']} composites (test/benchmark)")
    return 0
