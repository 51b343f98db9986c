"""``selva inspect DATASET``: what a dataset folder holds and how far its precompute got.

Everything comes from the small files (dataset.json, the manifest's shard column, the markers, the
failures tables and the table of input rows rejected before sharding); no tar is opened, so this is
quick even for a large dataset on a shared filesystem.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preprocessing.shards import (
    DATASET_JSON,
    MANIFEST_FILE,
    DatasetInfo,
    ShardError,
    failures_path,
    input_failures_path,
    read_dataset_info,
    read_failures,
    read_input_failures,
    shard_states,
)

MAX_LISTED = 10


def _encoder_line(role: str, spec: dict[str, Any]) -> str:
    name = spec.get("name", "?")
    version = spec.get("version")
    rest = ", ".join(f"{k}={v}" for k, v in sorted(spec.items()) if k not in ("name", "version"))
    return f"  {role:<10} {name}" + (f" ({version})" if version else "") + (f"  [{rest}]" if rest else "")


def _reasons(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _clips_per_split(dataset: Path) -> Counter[str]:
    import pyarrow.parquet as pq

    return Counter(pq.read_table(dataset / MANIFEST_FILE, columns=["split"]).column("split").to_pylist())


def _print_input_rejections(dataset: Path, info: DatasetInfo | None, out: Callable[[str], Any]) -> None:
    """Rows of the input table that never reached a shard: counts from dataset.json, examples with lines."""
    counts = info.input_rows if info is not None else {}
    rejected = read_input_failures(dataset)
    if not counts and not rejected:
        return  # a dataset made before input rejections were recorded
    total = counts.get("rows", "?")
    by_reason = Counter(f.reason for f in rejected)
    out(
        f"input table: {total} rows, {counts.get('clips', '?')} clips, {len(rejected)} rejected before sharding"
        + (f": {_reasons(by_reason)} ({input_failures_path(dataset).relative_to(dataset)})" if rejected else "")
    )
    for failure in rejected[:MAX_LISTED]:
        where = f"row {failure.row}" + (f" (line {failure.line})" if failure.line is not None else "")
        out(f"  {where} id={failure.source_id!r}: {failure.reason}: {failure.message}")
    if len(rejected) > MAX_LISTED:
        out(f"  ... and {len(rejected) - MAX_LISTED} more")


def print_dataset_summary(dataset_dir: str | Path, out: Callable[[str], Any] = print) -> None:
    """Print shards done/missing per split, samples, failures by reason, encoders and preset."""
    dataset = Path(dataset_dir)
    out(f"dataset {dataset}")
    try:
        info = read_dataset_info(dataset)
    except ShardError as exc:
        info = None
        out(f"  {exc}")
    if info is not None:
        out(
            f"  preset {info.preset}, seed {info.seed}, {info.samples_per_shard} samples per shard, "
            f"format v{info.format_version}"
        )
        out(f"  media root {info.media_root}")
        out(f"  manifest hash {info.manifest_hash[:16]}")
        if info.sequence_lengths:
            out("  sequence lengths " + ", ".join(f"{k} {v}" for k, v in sorted(info.sequence_lengths.items())))
        if info.encoders:
            out("encoders")
            for role, spec in sorted(info.encoders.items()):
                out(_encoder_line(role, spec))
    if not (dataset / MANIFEST_FILE).is_file():
        out(f"no {MANIFEST_FILE}: run the manifest step first" + ("" if info else f" (nor {DATASET_JSON})"))
        return

    _print_input_rejections(dataset, info, out)
    clips = _clips_per_split(dataset)
    states = shard_states(dataset)
    out(f"{'split':<12}{'shards done':>14}{'clips':>10}{'samples':>10}{'failed':>9}")
    reasons: Counter[str] = Counter()
    for split in sorted(clips):
        mine = [s for s in states if s.split == split]
        done = [s for s in mine if s.done and s.marker is not None]
        ok = sum(s.marker.num_ok for s in done)
        failed = sum(s.marker.num_failed for s in done)
        for state in done:
            reasons.update(state.marker.failures_by_reason)
        out(f"{split:<12}{f'{len(done)}/{len(mine)}':>14}{clips[split]:>10}{ok:>10}{failed:>9}")
    total_done = sum(s.done for s in states)
    out(f"{'total':<12}{f'{total_done}/{len(states)}':>14}{sum(clips.values()):>10}")
    out("failures by reason: " + (_reasons(reasons) if reasons else "none"))

    missing = [s for s in states if not s.done]
    if missing:
        out(f"missing shards ({len(missing)}):")
        for state in missing[:MAX_LISTED]:
            line = f"  {state.shard}: {state.reason}"
            if failures_path(dataset, state.shard).is_file():
                # a failures table without a marker: the shard stopped on its failure budget
                stopped = Counter(f.reason for f in read_failures(dataset, state.shard))
                line += f"; failures recorded: {_reasons(stopped)}"
            out(line)
        if len(missing) > MAX_LISTED:
            out(f"  ... and {len(missing) - MAX_LISTED} more")
