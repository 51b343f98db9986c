"""``selva inspect PATH...``: what the decoder makes of media files, and dataset folders' state.

For a media file it prints the container and streams (how the video is displayed when its display
matrix rotates or mirrors it; cover art as an attached picture, which is never video), then decodes
the clip exactly as precompute would for the chosen preset (``--start``/``--duration`` override the
range) and prints ``ok`` or the rejection reason and message, so a user sees why a clip was
rejected. A folder holding ``dataset.json`` is a dataset: its summary (shards done, samples,
failures by reason) is printed.

Exit status 0 whenever every path got an answer, whatever the verdicts; 1 if some path could not be
inspected at all (it does not exist, it is a folder but no dataset, or an unexpected error), so a
mistyped path fails a script; 2 for bad options.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preprocessing.errors import Rejected
from preprocessing.faults import describe, is_transient
from preprocessing.media import decode_clip
from preprocessing.media_probe import MediaInfo, StreamInfo, probe

Out = Callable[[str], Any]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help="show what the decoder makes of media files (or a dataset folder's state)",
        description="For each media file: container, streams, and the decode verdict for the preset "
        "(ok, or the rejection reason and message). A folder with dataset.json prints the dataset's "
        "summary. Exits 0 when every path got an answer, whatever the verdicts.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="media files or dataset folders")
    parser.add_argument("--preset", default="tiny", help="model preset for frame size and duration (default: tiny)")
    parser.add_argument("--start", type=float, default=0.0, help="clip start in seconds (default: 0)")
    parser.add_argument("--duration", type=float, default=None, help="clip length in seconds (default: preset's)")
    parser.set_defaults(func=run)
    return parser


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "size unknown"
    return f"{num_bytes / 1e6:.2f} MB" if num_bytes >= 1e5 else f"{num_bytes} bytes"


def describe_stream(stream: StreamInfo, used: bool = True) -> str:
    """One line per stream; video streams say how they are displayed (the display matrix, if any)."""
    dur = f", {stream.duration:.2f} s" if stream.duration is not None else ""
    if stream.kind == "video":
        fps = f", {stream.fps:.2f} fps" if stream.fps else ""
        frames = f", {stream.frames} frames" if stream.frames else ""
        shown = ""
        if stream.orientation is not None and (not stream.orientation.is_identity or stream.orientation.snapped):
            shown = f", shown {stream.orientation.describe()}"
        unused = "" if used else " (not used: another video stream is)"
        return f"video #{stream.index}: {stream.codec} {stream.width}x{stream.height}{fps}{frames}{dur}{shown}{unused}"
    if stream.kind == "attached_pic":
        return f"attached picture #{stream.index}: {stream.codec} {stream.width}x{stream.height} (cover art, not video)"
    if stream.kind == "audio":
        return f"audio #{stream.index}: {stream.codec} {stream.sample_rate} Hz, {stream.channels} ch{dur}"
    return f"{stream.kind} #{stream.index}: {stream.codec}{dur}"


def _print_info(info: MediaInfo, out: Out) -> None:
    duration = f"{info.duration:.2f} s" if info.duration is not None else "duration unknown"
    out(f"  container: {info.format}, {duration}, {_size(info.size_bytes)}")
    if not info.streams:
        out("  no streams")
    for stream in info.streams:
        out(f"  {describe_stream(stream, used=stream.kind != 'video' or stream.index == info.video_index)}")


def inspect_file(path: Path, *, start: float, duration: float, frame_size: int, out: Out = print,
                 sample_rate: int = 16_000, spectrogram_frame_rate: int = 256) -> str:
    """Print one media file's facts and verdict (decoded at the preset's audio rate, as precompute does);
    returns "ok" or the rejection reason."""
    out(str(path))
    try:
        _print_info(probe(path), out)
        clip = decode_clip(path, start=start, duration=duration, frame_size=frame_size, sample_rate=sample_rate,
                           spectrogram_frame_rate=spectrogram_frame_rate)
    except Rejected as rej:
        out(f"  result: {rej.reason.value}: {rej.message}")
        return rej.reason.value
    except Exception as err:
        if not is_transient(err):
            raise
        # the storage failed, not the file: say so instead of a verdict on its content
        out(f"  result: storage fault, not a verdict on the file (retry): {describe(err)}")
        return "storage_fault"
    t, s = clip.frames.shape[:2]
    out(
        f"  result: ok ({t} frames {s}x{s} at {clip.fps} fps, {len(clip.audio)} samples at {clip.sample_rate} Hz, "
        f"raw peak {clip.peak:.3f}, padded {clip.padded_frames} frames / {clip.padded_samples} samples, "
        f"frames {clip.orientation.describe()})"
    )
    return "ok"


def _inspect_dataset(path: Path, out: Out) -> None:
    from preprocessing.dataset_summary import print_dataset_summary  # the shard side, loaded only when needed

    print_dataset_summary(path, out=out)


def run(args: argparse.Namespace, out: Out = print) -> int:
    from selva.presets import get_preset

    try:
        preset = get_preset(args.preset)
    except KeyError as err:
        out(f"selva inspect: {err.args[0]}")
        return 2
    duration = preset.duration if args.duration is None else args.duration
    if duration <= 0 or args.start < 0:
        out(f"selva inspect: need --duration > 0 and --start >= 0 (got {duration}, {args.start})")
        return 2
    out(
        f"preset {preset.name}: {duration:g} s from {args.start:g} s, frames {preset.frame_size}x{preset.frame_size} "
        f"at 25 fps, audio {preset.sampling_rate / 1000:g} kHz mono"
    )
    verdicts: Counter[str] = Counter()
    unanswered = 0
    for raw in args.paths:
        path = Path(raw)
        try:
            if path.is_dir() and (path / "dataset.json").is_file():
                _inspect_dataset(path, out)
                verdicts["dataset"] += 1
            else:
                size = preset.frame_size
                seq = preset.seq
                verdicts[inspect_file(path, start=args.start, duration=duration, frame_size=size, out=out,
                                      sample_rate=seq.sampling_rate,
                                      spectrogram_frame_rate=seq.spectrogram_frame_rate)] += 1
        except Exception as err:  # noqa: BLE001 - one bad path must not hide the answers for the others
            out(f"{path}: could not inspect: {type(err).__name__}: {err}")
            unanswered += 1
    summary = ", ".join(f"{reason} {n}" for reason, n in sorted(verdicts.items(), key=lambda kv: (-kv[1], kv[0])))
    failed = f", {unanswered} not inspected" if unanswered else ""
    out(f"{len(args.paths)} paths: {summary or 'none answered'}{failed}")
    # a path that is not there is no answer about a clip (its verdict, missing_file, is printed all the same)
    return 1 if unanswered or verdicts["missing_file"] else 0
