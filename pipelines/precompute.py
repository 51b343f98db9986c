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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipelines.shard_processor import EncoderSpec, ShardResult
from preprocessing.faults import DEFAULT_RETRY_DELAYS
from preprocessing.manifest import (
    ManifestProblem,
    ManifestRow,
    build_manifest,
    manifest_hash,
    read_manifest,
    rows_by_shard,
    write_manifest,
)
from preprocessing.shards import (
    DATASET_JSON,
    DatasetInfo,
    InputFailure,
    done_and_missing,
    input_failures_path,
    read_dataset_info,
    read_marker,
    refresh_sample_counts,
    remove_stale_temporaries,
    write_dataset_info,
    write_input_failures,
)
from selva.presets import get_preset
from selva.sequence import SequenceConfig

MANIFEST = "manifest.parquet"


class PrecomputeError(RuntimeError):
    """The job cannot go on (a shard over its failure budget, an encoder error, a bad set-up)."""


@dataclass(frozen=True)
class PrecomputeConfig:
    input: str
    out: str
    media_root: str | None = None
    preset: str = "tiny"
    encoders: str = "embedded"
    weights: str | None = None
    samples_per_shard: int = 64
    workers: int = 2
    gpus_per_worker: float = 0.0
    retry_failed: bool = False
    seed: int = 0
    batch_size: int = 16
    max_failed_fraction: float = 0.5
    max_infra_retries: int = 3
    max_clip_crashes: int = 2  # worker deaths blamed on one clip before it is recorded as crashes_worker
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS  # back-off of a clip read after a storage fault
    progress: bool = True

    def spec(self, device: str = "cpu") -> EncoderSpec:
        return EncoderSpec(
            self.preset, self.encoders, self.weights, device, self.batch_size, self.max_failed_fraction,
            retry_delays=tuple(self.retry_delays),
        )


@dataclass
class PrecomputeReport:
    shards_total: int = 0
    shards_done_before: int = 0
    shards_run: list[str] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    failures_by_reason: Counter = field(default_factory=Counter)
    timings: Counter = field(default_factory=Counter)  # summed per stage over shards
    ray_start_seconds: float = 0.0
    worker_start_seconds: float = 0.0  # actors up with their encoders loaded
    run_seconds: float = 0.0
    infra_retries: int = 0
    clip_crashes: int = 0  # worker deaths blamed on the clip being decoded
    read_retries: int = 0  # clip reads retried after a storage or network fault
    prompts_encoded: int = 0  # distinct prompts encoded by the text stage this run
    prompts_stored_before: int = 0  # prompts of this run's shards found in the store
    prompts_encoded_by_workers: int = 0  # prompts shard workers encoded themselves (0 unless the store lacked them)

    def table(self) -> str:
        lines = [
            f"shards: {len(self.shards_run)} written this run, {self.shards_done_before} already done, "
            f"{self.shards_total} in the dataset",
            f"clips:  {self.ok} ok, {self.failed} failed",
        ]
        lines += [f"        {reason:<13} {count}" for reason, count in sorted(self.failures_by_reason.items())]
        text = f"text:   {self.prompts_encoded} distinct prompts encoded, {self.prompts_stored_before} already stored"
        if self.prompts_encoded_by_workers:
            text += f", {self.prompts_encoded_by_workers} encoded by shard workers"
        lines.append(text)
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(self.timings.items()))
        lines.append(
            f"time:   ray start {self.ray_start_seconds:.1f} s, workers ready {self.worker_start_seconds:.1f} s, "
            f"run {self.run_seconds:.1f} s ({stages})"
        )
        if self.infra_retries:
            lines.append(f"        {self.infra_retries} shard attempts retried after worker failures")
        if self.clip_crashes:
            lines.append(f"        {self.clip_crashes} worker deaths while decoding a clip (crashes_worker after "
                         f"repeated deaths on one clip)")
        if self.read_retries:
            lines.append(f"        {self.read_retries} clip reads retried after storage or network faults")
        return "\n".join(lines)


# -- manifest --------------------------------------------------------------------------------------
def prepare_dataset(cfg: PrecomputeConfig) -> tuple[list[ManifestRow], DatasetInfo]:
    """Build the manifest and dataset.json once; later runs reuse them (and refuse a different set-up)."""
    out = Path(cfg.out)
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
        recorded = info.extra.get("input_sha256")
        if recorded and recorded != _file_sha256(cfg.input):
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
    out.mkdir(parents=True, exist_ok=True)
    write_input_failures(out, [_input_failure(p) for p in rejected])
    total = len(rows) + len(rejected)  # every row is a clip or a rejection
    if total == 0:
        raise PrecomputeError(f"{cfg.input}: the table has no data rows (only a header or blank lines)")
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
    seq = SequenceConfig(preset.duration)
    shards = Counter(split for _shard, split in {(r.shard, r.split) for r in rows})
    info = DatasetInfo(
        preset=cfg.preset,
        media_root=media_root if "://" in media_root else str(Path(media_root).resolve()),  # a URL as given
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
        extra={"encoders_family": cfg.encoders, "input": str(cfg.input), "input_sha256": _file_sha256(cfg.input),
               "frame_size": preset.frame_size},
    )
    write_dataset_info(out, info)
    return rows, info


def _input_failure(problem: ManifestProblem) -> InputFailure:
    return InputFailure(
        problem.row, problem.line, problem.id, problem.key, problem.kind, problem.message,
        problem.collides_with_row, problem.collides_with_line,
    )


def _encoder_description(cfg: PrecomputeConfig) -> dict[str, dict]:
    preset = get_preset(cfg.preset)
    if cfg.encoders == "embedded":
        return {
            "t5": {"name": "minilm-l6-v2+fixed-projection", "dim": preset.textsynch.text_dim},
            "clip_text": {"name": "minilm-l6-v2+fixed-projection", "dim": preset.generator.text_dim},
            "codec": {"name": "log-mel", "latent_dim": preset.generator.latent_dim},
        }
    return {
        "t5": {"name": "flan-t5-base", "dim": preset.textsynch.text_dim},
        "clip_text": {"name": "DFN5B-CLIP-ViT-H-14-384", "dim": preset.generator.text_dim},
        "codec": {"name": "mmaudio-vae-16k", "latent_dim": preset.generator.latent_dim},
    }


def _file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    cfg = resolved(cfg)
    rows, info = prepare_dataset(cfg)
    # this run's --media-root wins over the one recorded at the manifest step (the media moved to
    # shared storage); the manifest's relative paths resolve against it
    media_root = cfg.media_root or info.media_root
    remove_stale_temporaries(cfg.out)  # leftovers of a killed run; never a finished file
    by_shard = rows_by_shard(rows)
    todo, done = shards_to_run(cfg, rows)
    report = PrecomputeReport(shards_total=len(by_shard), shards_done_before=len(done))
    if not todo:
        if not info.latent_stats:  # finished by a run killed after its last shard, before the refresh
            refresh_sample_counts(cfg.out)
        print(f"{cfg.out}: all {len(by_shard)} shards are done; nothing to do")
        return report
    from pipelines.ray_runner import run_on_ray  # Ray is imported only when there is work

    run_on_ray(cfg, todo, by_shard, report, media_root)
    refresh_sample_counts(cfg.out)
    return report


def add_result(report: PrecomputeReport, result: ShardResult) -> None:
    report.shards_run.append(result.shard)
    report.ok += result.ok
    report.failed += result.failed
    report.failures_by_reason.update(result.failures_by_reason)
    report.read_retries += result.retries
    report.timings.update(result.timings)
    report.prompts_encoded_by_workers += result.prompts_encoded


def config_from_args(args) -> PrecomputeConfig:
    fields = {k: v for k, v in vars(args).items() if k in PrecomputeConfig.__dataclass_fields__}
    return PrecomputeConfig(**fields)


def as_params(cfg: PrecomputeConfig) -> dict[str, str]:
    return {k: str(v) for k, v in asdict(cfg).items()}


