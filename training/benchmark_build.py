"""``selva benchmark build``: a VGG-MonoAudio-style test set from a table of single-source clips.

Output (``docs/benchmark.md``), for each subset ``intra_class`` and ``inter_class`` (partner rules:
``training.benchmark_plan``)::

    DIR/<subset>/mixed/<name>.mp4          target and partner side by side, with their audio mixture
    DIR/<subset>/target_audio/<name>.flac  the target clip's sound: mono at --sample-rate, duration x rate samples
    DIR/<subset>/metadata.csv              file_name,label,negative,placement,target,partner,paired_label
    DIR/rejected.csv                       every input row that could not be used, and why
    DIR/build.json                         options, input table hash, counts

Media rules. Each clip is decoded by ``preprocessing.media.decode_clip`` over [start, start +
duration): frames at 25 fps squashed to ``frame_size`` squared, audio mono at ``sample_rate`` (16 kHz
by default; 44.1 kHz for the 44.1 kHz models) peak-normalised to 0.95 -- what precompute gives training.
A composite is the two clips' frames joined side by side, (T, S, 2S, 3): each half keeps the S x S a
model sees of a single clip, and squashing the composite to S x S at generation time gives the λ = 0.5
mix of training. Its audio track is the sum
of the two normalised waveforms scaled back to peak 0.95 (both sources equally loud: neither can be
picked by level). The reference is the target's normalised waveform, cut to duration x rate samples.

Bad rows (not a clip: bad text, too short a span, a duplicate, a missing, unreadable, silent or
audio-less file) are printed as one line each, written to ``rejected.csv``, and left out; the
build goes on with the rest. Determinism: the plan depends only on the table, the media and the
options; every file is written to a temporary name and renamed, metadata last, so the same inputs
give byte-identical outputs (H.264, AAC and FLAC are written with FFmpeg's bit-exact flags).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from preprocessing.compact import encode_flac
from preprocessing.errors import Rejected, RejectReason
from preprocessing.input_rows import Collisions, judge_row, prompt_text
from preprocessing.input_table import read_input_table
from preprocessing.manifest import resolve_media_path
from preprocessing.media import TRAIN_PEAK, decode_clip
from preprocessing.mux import encode_av_mp4
from preprocessing.shards import TMP_SUFFIX, atomic_target, write_json_atomic
from training.benchmark_plan import DEFAULT_PARTNERS, SAFE_ID, SUBSETS, BenchClip, PlannedItem, plan_items
from training.benchmark_read import BenchmarkError

METADATA_COLUMNS = ("file_name", "label", "negative", "placement", "target", "partner", "paired_label")
REJECTED_COLUMNS = ("row", "line", "id", "path", "reason", "message")
FRAME_CACHE_BYTES = 2 << 30  # decoded clips kept in memory (30 MB per 8 s clip at 224 px); others are re-decoded
FPS, SAMPLE_RATE = 25, 16_000  # SAMPLE_RATE: the default; BuildOptions.sample_rate sets it


@dataclass(frozen=True)
class BuildOptions:
    duration: float = 8.0  # seconds per clip, composite and reference
    seed: int = 0
    partners: int = DEFAULT_PARTNERS  # per target and subset
    frame_size: int = 224  # each half of a composite is frame_size x frame_size
    media_root: str | None = None  # where relative paths resolve; default: the table's folder
    text_column: str | None = None
    reciprocal: bool = False  # every composite asked for each of its two objects (benchmark_plan.plan_items)
    # the reference audio's rate: the model's (16 kHz, or 44.1 kHz for the 44.1 kHz presets), so that metrics
    # whose embedder runs at 32 or 48 kHz compare against the full band the model was trained on
    sample_rate: int = SAMPLE_RATE


@dataclass(frozen=True)
class Rejection:
    row: int
    line: int | None
    id: str
    path: str
    reason: str
    message: str

    def __str__(self) -> str:
        where = f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")
        return f"rejected {where} id={self.id!r} {self.path}: {self.reason}: {self.message}"


@dataclass
class BuildResult:
    out: Path
    clips: int  # rows that became usable clips
    items: dict[str, int] = field(default_factory=dict)  # subset -> composites written
    rejected: list[Rejection] = field(default_factory=list)


def _read_rows(table_path: Path, options: BuildOptions) -> tuple[list[tuple[BenchClip, int | None]], list[Rejection]]:
    """Usable rows as (clip, table line) and rejected rows, by the precompute table rules plus
    one of ours: ids name files here, so an id must be file-name safe and used once."""
    table = read_input_table(table_path, text_column=options.text_column)
    root = options.media_root if options.media_root is not None else os.fspath(table.path.parent)
    collisions, ids = Collisions(), set()
    clips: list[tuple[BenchClip, int | None]] = []
    rejected: list[Rejection] = []
    for item in table.rows:
        clip, problem = judge_row(item, table, options.duration, "test")
        if problem is not None:
            raw_path = str(item.values.get("path") or "").strip() or (f"{problem.id}.mp4" if problem.id else "")
            path = resolve_media_path(raw_path, root) if raw_path else ""
            rejected.append(Rejection(item.row, item.line, problem.id, path, problem.kind, problem.message))
            continue
        assert clip is not None
        path = resolve_media_path(clip.path, root)
        reject = lambda reason, message: Rejection(item.row, item.line, clip.source_id, path, reason, message)  # noqa: B023
        problem = collisions.check(clip, path if "://" in path else os.path.abspath(path))
        if problem is not None:
            rejected.append(reject(problem.kind, problem.message))
        elif not SAFE_ID.match(clip.source_id):
            rejected.append(reject(RejectReason.BAD_ROW.value, "id is used in file names: letters, digits, "
                                   "'_', '-', '.', '+', '=' only, not starting with '.'"))
        elif clip.source_id in ids:
            rejected.append(reject(RejectReason.DUPLICATE.value, "id already used by an earlier row (ids name files)"))
        else:
            ids.add(clip.source_id)
            category, _ = prompt_text(item.values.get("category"))
            bench_clip = BenchClip(clip.source_id, path, clip.start, clip.text, category or None, item.row)
            clips.append((bench_clip, item.line))
    return clips, rejected


class _Clips:
    """Decoded clips: every reference waveform, and the frames of as many clips as fit the budget."""

    def __init__(self, options: BuildOptions):
        self.options = options
        self.audio: dict[str, np.ndarray] = {}
        self.frames: OrderedDict[str, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.samples = round(options.duration * options.sample_rate)

    def _decode(self, clip: BenchClip):
        return decode_clip(clip.path, start=clip.start, duration=self.options.duration,
                           frame_size=self.options.frame_size, sample_rate=self.options.sample_rate,
                           name=clip.id)  # fmt: skip

    def load(self, clip: BenchClip) -> None:
        """Decode ``clip`` once (raises ``Rejected``); keeps its audio and, budget allowing, frames."""
        decoded = self._decode(clip)
        self.audio[clip.id] = decoded.audio[: self.samples].copy()
        self._keep(clip.id, decoded.frames)

    def _keep(self, clip_id: str, frames: np.ndarray) -> None:
        self.frames[clip_id] = frames
        self.bytes += frames.nbytes
        while self.bytes > FRAME_CACHE_BYTES and len(self.frames) > 1:
            _, dropped = self.frames.popitem(last=False)
            self.bytes -= dropped.nbytes

    def video(self, clip: BenchClip) -> np.ndarray:
        if clip.id in self.frames:
            self.frames.move_to_end(clip.id)
            return self.frames[clip.id]
        frames = self._decode(clip).frames  # decoding is deterministic: the same frames as the first time
        self._keep(clip.id, frames)
        return frames


def composite(item: PlannedItem, clips: _Clips) -> tuple[np.ndarray, np.ndarray]:
    """(frames (T, S, 2S, 3) uint8, mixture (N,) float32): the target on ``item.placement``'s side."""
    target, partner = clips.video(item.target), clips.video(item.partner)
    halves = (target, partner) if item.placement == "left" else (partner, target)
    mixture = clips.audio[item.target.id].astype(np.float64) + clips.audio[item.partner.id]
    peak = float(np.max(np.abs(mixture)))
    if peak > 0:  # two tones in antiphase could cancel; then the track stays silent rather than NaN
        mixture *= TRAIN_PEAK / peak
    return np.concatenate(halves, axis=2), mixture.astype(np.float32)


def _progress(items: list, desc: str, unit: str) -> Iterable:
    """A progress bar on stderr where it is a terminal (a build of ~1,000 composites takes ~20 min)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, disable=None, mininterval=1.0, leave=False)


def _sides(item: PlannedItem) -> tuple[str, str]:
    """(left clip id, right clip id) of a composite."""
    pair = (item.target.id, item.partner.id)
    return pair if item.placement == "left" else (pair[1], pair[0])


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[tuple]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    _write_bytes(path, buf.getvalue().encode("utf-8"))


def _prepare_out(out: Path, planned: set[Path]) -> None:
    """Refuse a folder that is not ours. In one of ours, first drop the old metadata (so no metadata
    row can outlive its files if this build dies), then the composites and references the new plan
    does not have (an earlier build with other options) and temporaries left by a kill."""
    if out.exists() and not out.is_dir():
        raise BenchmarkError(f"{out}: is a file; --out wants a folder")
    if out.exists() and any(out.iterdir()) and not (out / "build.json").is_file():
        raise BenchmarkError(f"{out}: exists, is not empty and holds no build.json: not overwriting it")
    for subset in SUBSETS:
        (out / subset / "metadata.csv").unlink(missing_ok=True)
    (out / "rejected.csv").unlink(missing_ok=True)
    for folder in (out, *(out / s for s in SUBSETS)):
        for tmp in folder.glob(f".*{TMP_SUFFIX}") if folder.is_dir() else ():
            tmp.unlink()
    for subset in SUBSETS:
        for folder in (out / subset / "mixed", out / subset / "target_audio"):
            for path in folder.iterdir() if folder.is_dir() else ():
                if path.is_file() and path not in planned and path.suffix in (".mp4", ".flac", TMP_SUFFIX):
                    path.unlink()


def _metadata_row(item: PlannedItem) -> tuple:
    negative = item.partner.label
    return (f"mixed/{item.name}.mp4", item.target.label, negative, item.placement, item.target.id, item.partner.id,
            negative)  # fmt: skip


def build_benchmark(
    table: str | Path, out: str | Path, options: BuildOptions = BuildOptions(),
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> BuildResult:  # fmt: skip
    """Build the benchmark of ``table``'s clips into ``out`` (see the module doc); ``log`` gets one
    line per rejected row and per subset."""
    if options.sample_rate < 8_000:
        raise BenchmarkError(f"--sample-rate must be at least 8000 Hz (the models use 16000 or 44100); "
                             f"got {options.sample_rate}")
    if not options.duration > 0 or options.frame_size <= 0 or options.frame_size % 2 or options.partners < 1:
        raise BenchmarkError(f"need duration > 0, an even frame size > 0 and partners >= 1; got {options.duration}, "
                             f"{options.frame_size}, {options.partners}")
    table, out = Path(table), Path(out)
    rows, rejected = _read_rows(table, options)
    for rejection in rejected:
        log(str(rejection))
    clips = _Clips(options)
    usable: list[BenchClip] = []
    for clip, line in _progress(rows, "decode", "clip"):
        try:
            clips.load(clip)
        except Rejected as err:
            rejected.append(Rejection(clip.row, line, clip.id, clip.path, err.reason.value, err.message))
            log(str(rejected[-1]))
            continue
        usable.append(clip)
    rejected.sort(key=lambda r: r.row)
    items = plan_items(usable, seed=options.seed, partners=options.partners, reciprocal=options.reciprocal)
    planned = {out / i.subset / folder / f"{i.name}{ext}" for i in items
               for folder, ext in (("mixed", ".mp4"), ("target_audio", ".flac"))}  # fmt: skip
    _prepare_out(out, planned)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "build.json", {"status": "building"})  # marks the folder as ours before any media
    result = BuildResult(out, len(usable), rejected=rejected)
    for subset in SUBSETS:
        chosen = [i for i in items if i.subset == subset]
        # "A left of B" is planned twice when both A -> B and B -> A are drawn (target A left, target
        # B right): the same pixels and track, so the bytes of the first are kept for the second only
        uses = Counter(_sides(i) for i in chosen)
        pending: dict[tuple[str, str], bytes] = {}
        for item in _progress(chosen, subset, "composite"):
            data = pending.pop(_sides(item), None)
            if data is None:
                data = encode_av_mp4(*composite(item, clips), fps=FPS, sample_rate=options.sample_rate)
                if uses[_sides(item)] > 1:
                    pending[_sides(item)] = data
            _write_bytes(out / subset / "mixed" / f"{item.name}.mp4", data)
            _write_bytes(out / subset / "target_audio" / f"{item.name}.flac",
                         encode_flac(clips.audio[item.target.id], options.sample_rate))  # fmt: skip
        (out / subset).mkdir(parents=True, exist_ok=True)
        _write_csv(out / subset / "metadata.csv", METADATA_COLUMNS, [_metadata_row(i) for i in chosen])
        result.items[subset] = len(chosen)
        why = ""
        if subset == "intra_class" and not chosen and not any(c.category for c in usable):
            why = "; intra-class pairs need a category column (same category, another label)"
        log(f"{subset}: {len(chosen)} composites ({len(chosen) // 2} pairs, both placements){why}")
    rejected_rows = [(r.row, "" if r.line is None else r.line, r.id, r.path, r.reason, r.message) for r in rejected]
    _write_csv(out / "rejected.csv", REJECTED_COLUMNS, rejected_rows)
    write_json_atomic(out / "build.json", {
        "status": "complete", "table": str(table), "table_sha256": hashlib.sha256(table.read_bytes()).hexdigest(),
        "options": asdict(options), "clips": len(usable), "items": result.items, "rejected": len(rejected),
    })  # fmt: skip
    return result
