"""Media decode speed: ``preprocessing.media.decode_clip`` vs one FFmpeg filter-graph pass.

Both turn [start, start + duration) of each clip into sync frames (25 fps, squashed to S x S, RGB
uint8) and 16 kHz mono float32 audio. The baseline is what ``ffmpeg -ss START -t DUR -i clip
-vf fps=25,scale=S:S -af aresample=16000,aformat=flt:mono`` does, run through the FFmpeg libraries
PyAV bundles (there is no ffmpeg binary here): the same demuxer and decoders, then
``fps -> scale -> format=rgb24`` and ``aresample -> aformat`` filter graphs, stopping at the end of
the range. Runs alternate between the two; the best of ``--repeats`` counts, both in clips per
wall-clock second and in CPU seconds per clip (all threads; steadier on a shared machine). Both
ratios read "higher is better for ours": 1.0 is parity with the FFmpeg pass.

    .venv/bin/python benchmarks/decode.py --sizes 64 224 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from preprocessing.media import INTERPOLATION, decode_clip  # noqa: E402

DEFAULT_CLIPS = REPO_ROOT.parent / "shared" / "data" / "real"


def _drain(graph: av.filter.Graph, out: list) -> None:
    while True:
        try:
            out.append(graph.pull())
        except (BlockingIOError, av.error.BlockingIOError, EOFError, av.error.EOFError):
            return


def ffmpeg_graph_decode(path: Path, start: float, duration: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The FFmpeg-library baseline: decode + filter graphs, one demux pass, both streams."""
    n_frames = int(duration * 25)
    with av.open(str(path)) as container:
        vstream, astream = container.streams.video[0], container.streams.audio[0]
        vstream.thread_type = "AUTO"
        if start > 0:
            container.seek(int(start / vstream.time_base), stream=vstream)
        vgraph = av.filter.Graph()
        vgraph.link_nodes(
            vgraph.add_buffer(template=vstream),
            vgraph.add("trim", f"start={start}"),
            vgraph.add("fps", "25"),
            vgraph.add("scale", f"{size}:{size}:flags={INTERPOLATION.lower()}"),
            vgraph.add("format", "rgb24"),
            vgraph.add("buffersink"),
        ).configure()
        agraph = av.filter.Graph()
        agraph.link_nodes(
            agraph.add_abuffer(template=astream),
            agraph.add("atrim", f"start={start}:duration={duration}"),
            agraph.add("aresample", "16000"),
            agraph.add("aformat", "sample_fmts=flt:channel_layouts=mono"),
            agraph.add("abuffersink"),
        ).configure()
        vframes: list = []
        aframes: list = []
        video_done = audio_done = False
        end = start + duration
        for packet in container.demux(vstream, astream):
            is_video = packet.stream is vstream
            if (video_done if is_video else audio_done):
                continue
            graph, sink = (vgraph, vframes) if is_video else (agraph, aframes)
            for frame in packet.decode():
                graph.push(frame)
                _drain(graph, sink)
                if frame.time is not None and frame.time >= end:
                    video_done, audio_done = (True, audio_done) if is_video else (video_done, True)
            if video_done and audio_done:
                break
        for graph, sink in ((vgraph, vframes), (agraph, aframes)):
            graph.push(None)
            _drain(graph, sink)
    frames = np.stack([f.to_ndarray() for f in vframes[:n_frames]])
    audio = np.concatenate([f.to_ndarray().reshape(-1) for f in aframes])
    return frames, audio


def ours(path: Path, start: float, duration: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    clip = decode_clip(path, start=start, duration=duration, frame_size=size)
    return clip.frames, clip.audio


def measure(fn: Callable, clips: list[Path], start: float, duration: float, size: int) -> tuple[float, float]:
    """(clips per wall-clock second, CPU seconds per clip over all threads) for one pass over ``clips``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for clip in clips:
        frames, _ = fn(clip, start, duration, size)
        assert frames.shape == (int(duration * 25), size, size, 3), frames.shape
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(clips) / wall, cpu / len(clips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=Path, nargs="+", default=sorted(DEFAULT_CLIPS.glob("*.mp4")))
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.clips:
        parser.error(f"no clips found in {DEFAULT_CLIPS}; pass --clips")
    print(f"{len(args.clips)} clips, {args.duration:g} s from {args.start:g} s; PyAV {av.__version__}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; best of {args.repeats}")
    print("| S | ours clips/s | FFmpeg clips/s | ratio (wall) | ours CPU s/clip | FFmpeg CPU s/clip | ratio (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "ffmpeg": []}
        measure(ours, args.clips[:1], args.start, args.duration, size)  # warm-up: page cache, libraries
        for _ in range(args.repeats):  # alternate, so a burst of load elsewhere hits both
            runs["ours"].append(measure(ours, args.clips, args.start, args.duration, size))
            runs["ffmpeg"].append(measure(ffmpeg_graph_decode, args.clips, args.start, args.duration, size))
        rate = {k: max(r for r, _ in v) for k, v in runs.items()}
        cpu = {k: min(c for _, c in v) for k, v in runs.items()}
        print(f"| {size} | {rate['ours']:.2f} | {rate['ffmpeg']:.2f} | {rate['ours'] / rate['ffmpeg']:.2f} "
              f"| {cpu['ours']:.3f} | {cpu['ffmpeg']:.3f} | {cpu['ffmpeg'] / cpu['ours']:.2f} |")


if __name__ == "__main__":
    main()
