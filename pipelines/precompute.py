"""The precompute job: an input table of clips -> a dataset of WebDataset shards, on Ray.

    selva precompute --input clips.tsv --media-root media/ --out data/v1 [--preset tiny]
                     [--encoders embedded|official --weights DIR] [--workers N] [--retry-failed]

Steps: build (or reuse) ``manifest.parquet`` with a fixed shard assignment; find the shards without
a done-marker; run one task per shard on a pool of Ray actors, each of which loads the frozen
encoders once; write every shard atomically (tar, failures, marker last). A rerun does only what is
missing, so a killed job resumes where it stopped; ``--retry-failed`` re-attempts only the recorded
failures, keeping every sample already written.

Infrastructure errors (an actor or its node died) are retried on a fresh actor (a clip that kills
its worker repeatedly is recorded as ``crashes_worker``); data errors are recorded per clip and
never retried; storage faults are retried per clip, then fail the shard (docs/precompute.md, "Error
classes"); a shard over its failure budget or an encoder error stops the job with a message naming
the shard. ``RAY_ADDRESS`` (or ``ray job submit``) sends the same
command to a cluster.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

from pipelines.precompute_config import (  # re-exported: the job's public names
    PrecomputeConfig,
    PrecomputeError,
    PrecomputeReport,
    add_result,
    as_params,
    config_from_args,
)
from preprocessing.manifest import (
    ManifestProblem,
    ManifestRow,
    build_manifest,
    manifest_hash,
    read_manifest,
    rows_by_shard,
    write_manifest,
)
from preprocessing.redact import redact
from preprocessing.shards import (
    DATASET_JSON,
    DatasetInfo,
    InputFailure,
    done_and_missing,
    file_sha256,
    input_failures_path,
    read_dataset_info,
    read_marker,
    refresh_sample_counts,
    remove_stale_temporaries,
    write_dataset_info,
    write_input_failures,
)
from selva.presets import get_preset

MANIFEST = "manifest.parquet"
__all__ = [
    "PrecomputeConfig", "PrecomputeError", "PrecomputeReport", "add_result", "as_params", "config_from_args",
    "prepare_dataset", "resolve_path", "resolved", "run_precompute", "shards_to_run",
]  # fmt: skip


def _numerics(cfg: PrecomputeConfig) -> dict[str, object]:
    """What the encoders' numbers depend on besides the weights: batch composition and the device kind."""
    on_gpu = cfg.gpus_per_encoder > 0 if cfg.encoder_actors else cfg.gpus_per_worker > 0
    return {"batch_size": cfg.batch_size, "encoder_device": "cuda" if on_gpu else "cpu"}


# -- manifest --------------------------------------------------------------------------------------
def prepare_dataset(cfg: PrecomputeConfig) -> tuple[list[ManifestRow], DatasetInfo]:
    """Build the manifest and dataset.json once; later runs reuse them (and refuse a different set-up)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PrecomputeError(f"{out}: --out is an existing file; it names the dataset folder to create or resume")
    preset = get_preset(cfg.preset)
    manifest_path = out / MANIFEST
    if (out / DATASET_JSON).exists():  # written last: its presence means the manifest step finished
        info = read_dataset_info(out)
        wanted = {"preset": cfg.preset, "seed": cfg.seed, "samples_per_shard": cfg.samples_per_shard}
        found = {"preset": info.preset, "seed": info.seed, "samples_per_shard": info.samples_per_shard}
        if wanted != found or info.extra.get("encoders_family", cfg.encoders) != cfg.encoders:
            raise PrecomputeError(
                f"{out} was made with {found} and encoders {info.extra.get('encoders_family')}; this run asks "
                f"for {wanted} and encoders {cfg.encoders}. Use a new --out for a different set-up."
            )
        for key, value in _numerics(cfg).items():  # datasets made before these were recorded carry none
            if key in info.extra and info.extra[key] != value:
                what = {"batch_size": "--batch-size", "encoder_device": "encoders on"}[key]
                raise PrecomputeError(
                    f"{out} was encoded with {what} {info.extra[key]}; this run asks for {value}. Encoder outputs "
                    f"depend on it (a GPU's kernels differ from a CPU's, batched kernels from unbatched ones), so "
                    f"one dataset keeps one setting: resume with {what} {info.extra[key]}, or use a new --out."
                )
        recorded = info.extra.get("input_sha256")
        if recorded and recorded != file_sha256(cfg.input):
            raise PrecomputeError(
                f"{out} was built from a different version of the input table ({info.extra.get('input')}); "
                f"{cfg.input} has changed since. A dataset version is immutable: use a new --out."
            )
        rows = read_manifest(manifest_path)
        if manifest_hash(rows) != info.manifest_hash:
            raise PrecomputeError(f"{manifest_path} does not match dataset.json's manifest_hash; was it edited?")
        odd = [r for r in rows if r.duration != preset.duration]
        if odd:  # manifests from before spans were cut to the preset: samples would not share shapes
            raise PrecomputeError(
                f"{manifest_path}: {len(odd)} clip(s) are not {preset.duration:g} s long (e.g. row {odd[0].row}: "
                f"{odd[0].duration:g} s); it was made by an older version. Rebuild it with a new --out."
            )
        return rows, info

    media_root = cfg.media_root or str(Path(cfg.input).resolve().parent)
    rows, problems = build_manifest(
        cfg.input, duration=preset.duration, seed=cfg.seed, samples_per_shard=cfg.samples_per_shard,
        media_root=media_root,
    )
    rejected = [p for p in problems if p.rejects]
    for problem in problems[:20]:
        print(f"input problem: {problem}")
    if len(problems) > 20:
        print(f"... and {len(problems) - 20} more input problems")
    total = len(rows) + len(rejected)  # every row is a clip or a rejection
    if total == 0:
        raise PrecomputeError(f"{cfg.input}: the table has no data rows (only a header or blank lines)")
    out.mkdir(parents=True, exist_ok=True)
    write_input_failures(out, [_input_failure(p) for p in rejected])
    by_reason = dict(sorted(Counter(p.kind for p in rejected).items()))
    if rejected:
        print(f"{len(rejected)} of {total} input rows rejected ({by_reason}); recorded in {input_failures_path(out)}")
    if total and len(rejected) / total > cfg.max_failed_fraction:
        raise PrecomputeError(
            f"{cfg.input}: {len(rejected)} of {total} rows rejected (budget {cfg.max_failed_fraction:.0%}): "
            f"{by_reason}; see {input_failures_path(out)} (`selva inspect {out}`). Is it the right table and "
            f"text column? Fix the table, or pass --max-failed-fraction to accept it."
        )
    if not rows:
        print(f"warning: no clip is left of {cfg.input}: all {total} rows were rejected; the dataset is empty")
    write_manifest(rows, manifest_path)
    seq = preset.seq
    shards = Counter(split for _shard, split in {(r.shard, r.split) for r in rows})
    info = DatasetInfo(
        preset=cfg.preset,
        # a URL as given, but never its credentials (user:password, a signed query): a rerun gives it again
        media_root=redact(media_root) if "://" in media_root else str(Path(media_root).resolve()),
        encoders=_encoder_description(cfg),
        sequence_lengths={"latent": seq.latent_seq_len, "clip_text": preset.generator.text_seq_len,
                          "sync_frames": seq.sync_num_frames, "audio_samples": seq.num_audio_frames},
        seed=cfg.seed,
        samples_per_shard=cfg.samples_per_shard,
        manifest_hash=manifest_hash(rows),
        input_rows={"rows": total, "clips": len(rows), "rejected": len(rejected), "rejected_by_reason": by_reason},
        clips=dict(Counter(r.split for r in rows)),
        shards=dict(shards),
        versions=_versions(),
        extra={"encoders_family": cfg.encoders, "input": str(cfg.input), "input_sha256": file_sha256(cfg.input),
               "frame_size": preset.frame_size, **_numerics(cfg)},
    )
    write_dataset_info(out, info)
    return rows, info


def _input_failure(problem: ManifestProblem) -> InputFailure:
    return InputFailure(
        problem.row, problem.line, problem.id, problem.key, problem.kind, problem.message,
        problem.collides_with_row, problem.collides_with_line,
    )


def _encoder_description(cfg: PrecomputeConfig) -> dict[str, dict]:
    from selva.encoders import describe_encoders

    return describe_encoders(cfg.encoders, get_preset(cfg.preset))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("selva-pipeline", "torch", "av", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def shards_to_run(cfg: PrecomputeConfig, rows: list[ManifestRow]) -> tuple[list[str], list[str]]:
    """(shards to (re)write, shards already done). With ``retry_failed`` done shards with failures rerun."""
    done, missing = done_and_missing(cfg.out)
    todo = list(missing)
    if cfg.retry_failed:
        for shard in done:
            marker = read_marker(cfg.out, shard)
            if marker is not None and marker.num_failed:
                todo.append(shard)
    known = set(rows_by_shard(rows))
    return [s for s in sorted(todo) if s in known], [s for s in done if s not in todo]


# -- the job ---------------------------------------------------------------------------------------
def resolve_path(path: str | None) -> str | None:
    """An absolute local path (``~`` expanded), or a URL (``scheme://``) unchanged."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolved(cfg: PrecomputeConfig) -> PrecomputeConfig:
    """``cfg`` with every path made absolute, once, on the driver: Ray workers on a cluster run in
    their own working directories, where a relative ``--out`` or ``--weights`` means something else."""
    return replace(
        cfg, input=resolve_path(cfg.input), out=resolve_path(cfg.out),
        media_root=resolve_path(cfg.media_root), weights=resolve_path(cfg.weights),
    )  # fmt: skip


def run_precompute(cfg: PrecomputeConfig) -> PrecomputeReport:
    cfg.check()
    cfg = resolved(cfg)
    rows, info = prepare_dataset(cfg)
    # this run's --media-root wins over the one recorded at the manifest step (the media moved to
    # shared storage); the manifest's relative paths resolve against it
    media_root = cfg.media_root or info.media_root
    if not cfg.media_root and "***" in media_root:
        raise PrecomputeError(f"{cfg.out}/dataset.json records the media root without its credentials "
                              f"({media_root}): give --media-root with them again to resume")
    remove_stale_temporaries(cfg.out)  # leftovers of a killed run; never a finished file
    by_shard = rows_by_shard(rows)
    todo, done = shards_to_run(cfg, rows)
    report = PrecomputeReport(shards_total=len(by_shard), shards_done_before=len(done))
    if not todo:
        if not info.latent_stats:  # finished by a run killed after its last shard, before the refresh
            refresh_sample_counts(cfg.out)
        print(f"{cfg.out}: all {len(by_shard)} shards are done; nothing to do")
        return report
    # Ray is imported only when there is work
    if cfg.encoder_actors:
        from pipelines.ray_two_stage import run_two_stage

        run_two_stage(cfg, todo, by_shard, report, media_root)
    else:
        from pipelines.ray_runner import run_on_ray

        run_on_ray(cfg, todo, by_shard, report, media_root)
    # a worker killed mid-write (OOM, lost node) leaves its temporary file; the shard was redone by another,
    # so a finished dataset holds only finished files, as a clean run's does
    remove_stale_temporaries(cfg.out)
    refresh_sample_counts(cfg.out)
    return report
