"""The precompute job's configuration, its report and its error: the types the driver
(``pipelines.precompute``) and the Ray runner (``pipelines.ray_runner``) share.

Apart from the job so that the runner needs nothing of the driver (no import cycle between them).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from pipelines.shard_processor import ShardResult, WorkerSettings
from preprocessing.faults import DEFAULT_RETRY_DELAYS
from preprocessing.media_probe import IO_TIMEOUT_S
from preprocessing.redact import redact


class PrecomputeError(RuntimeError):
    """The job cannot go on (a shard over its failure budget, an encoder error, a bad set-up)."""


# Ray's own resources: a custom --encoder-resource may not reuse these names (Ray refuses them with an
# assertion or a ValueError deep in ray.init / actor options)
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
RAY_BUILTIN_PREFIXES = ("node:", "accelerator_type:")


@dataclass(frozen=True)
class PrecomputeConfig:
    input: str
    out: str
    media_root: str | None = None
    preset: str = "tiny"
    encoders: str = "embedded"
    weights: str | None = None
    samples_per_shard: int = 64
    workers: int = 2  # one-stage: shard workers (each decodes and encodes); two-stage: decode tasks at once
    gpus_per_worker: float = 0.0  # one-stage only
    # two-stage design (pipelines/ray_two_stage.py) when >= 1: this many encoder actors, each holding the
    # encoders once (one per GPU on a GPU node), fed by `workers` CPU decode tasks; 0: the one-stage pool
    encoder_actors: int = 0
    gpus_per_encoder: float = 0.0
    encoder_resource: str | None = None  # a custom Ray resource each encoder actor takes one unit of
    encoder_cpus: float = 1.0  # CPUs an encoder actor holds (it feeds its GPU, or computes on CPU)
    retry_failed: bool = False
    seed: int = 0
    batch_size: int = 16
    max_failed_fraction: float = 0.5
    max_infra_retries: int = 3
    max_clip_crashes: int = 2  # worker deaths blamed on one clip before it is recorded as crashes_worker
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS  # back-off of a clip read after a storage fault
    io_timeout_s: float = IO_TIMEOUT_S  # seconds a media URL may leave a read waiting (then: a storage fault)
    progress: bool = True

    def check(self) -> None:
        """PrecomputeError naming the first impossible setting."""
        if self.workers < 1:
            raise PrecomputeError(f"--workers must be at least 1, got {self.workers}")
        if self.encoder_actors < 0:
            raise PrecomputeError(f"--encoder-actors must be 0 (one-stage) or more, got {self.encoder_actors}")
        shares = {"--gpus-per-worker": self.gpus_per_worker, "--gpus-per-encoder": self.gpus_per_encoder,
                  "--encoder-cpus": self.encoder_cpus, "--max-failed-fraction": self.max_failed_fraction}
        for flag, value in shares.items():
            if not math.isfinite(value):
                raise PrecomputeError(f"{flag} must be a finite number, got {value}")
        if min(self.gpus_per_worker, self.gpus_per_encoder, self.encoder_cpus) < 0:
            raise PrecomputeError("GPU and CPU shares must not be negative")
        name = self.encoder_resource
        if name is not None and (not name.strip() or name in RAY_BUILTIN_RESOURCES
                                 or name.startswith(RAY_BUILTIN_PREFIXES)):
            raise PrecomputeError(f"--encoder-resource {name!r} is not a custom resource name ("
                                  f"{', '.join(RAY_BUILTIN_RESOURCES)} are Ray's own: for GPUs use --gpus-per-encoder)")
        if self.encoder_actors == 0 and (self.gpus_per_encoder or self.encoder_resource):
            raise PrecomputeError("--gpus-per-encoder and --encoder-resource need --encoder-actors N (the two-stage "
                                  "design); the one-stage pool takes --gpus-per-worker")  # fmt: skip
        if self.encoder_actors and self.gpus_per_worker:
            raise PrecomputeError("--gpus-per-worker is for the one-stage pool; with --encoder-actors the encoders "
                                  "hold the GPUs: use --gpus-per-encoder")  # fmt: skip
        if self.batch_size < 1 or self.samples_per_shard < 1:
            raise PrecomputeError("--batch-size and --samples-per-shard must be at least 1")

    def worker_settings(self, device: str = "cpu") -> WorkerSettings:
        return WorkerSettings(
            self.preset, self.encoders, self.weights, device, self.batch_size, self.max_failed_fraction,
            retry_delays=tuple(self.retry_delays), io_timeout_s=self.io_timeout_s,
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
    design: str = "one-stage"  # or "two-stage" (decode tasks feeding encoder actors)
    encoder_builds: int = 0  # processes that built the frozen encoders (actors started, replacements included)
    encode_batches: Counter = field(default_factory=Counter)  # codec batch size -> batches
    decode_spans: list[tuple[float, float]] = field(default_factory=list)  # wall-clock (start, end) per shard
    nodes: dict[str, set[str]] = field(default_factory=dict)  # "decode"/"encode" -> Ray node ids that ran them

    @property
    def max_decodes_at_once(self) -> int:
        """The most shard decodes that overlapped in time (from their wall-clock spans)."""
        events = sorted([(s, 1) for s, _ in self.decode_spans] + [(e, -1) for _, e in self.decode_spans])
        running = best = 0
        for _, step in events:  # an end sorts before a start at the same instant: touching is not overlapping
            running += step
            best = max(best, running)
        return best

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
        if self.design == "two-stage":
            batches = ", ".join(f"{n} x {size}" for size, n in sorted(self.encode_batches.items(), reverse=True))
            lines.append(f"design: two-stage: {self.encoder_builds} encoder actor(s) built, codec batches "
                         f"{batches or 'none'}, up to {self.max_decodes_at_once} decodes at once")  # fmt: skip
        if self.infra_retries:
            lines.append(
                f"        {self.infra_retries} tasks (shards or the text stage) rerun on fresh workers "
                "after a worker died"
            )
        if self.clip_crashes:
            lines.append(f"        {self.clip_crashes} worker deaths while decoding a clip (crashes_worker after "
                         f"repeated deaths on one clip)")
        if self.read_retries:
            lines.append(f"        {self.read_retries} clip reads retried after storage or network faults")
        return "\n".join(lines)


def add_result(report: PrecomputeReport, result: ShardResult) -> None:
    report.shards_run.append(result.shard)
    report.ok += result.ok
    report.failed += result.failed
    report.failures_by_reason.update(result.failures_by_reason)
    report.read_retries += result.retries
    report.timings.update(result.timings)
    report.prompts_encoded_by_workers += result.prompts_encoded
    report.encode_batches.update(result.encode_batches)
    report.decode_spans.append(result.decode_span)
    for stage, node in (("decode", result.decoder_node), ("encode", result.encoder_node)):
        if node:
            report.nodes.setdefault(stage, set()).add(node)


def config_from_args(args) -> PrecomputeConfig:
    fields = {k: v for k, v in vars(args).items() if k in PrecomputeConfig.__dataclass_fields__}
    return PrecomputeConfig(**fields)


def as_params(cfg: PrecomputeConfig) -> dict[str, str]:
    """MLflow params; credentials in a media URL (``https://user:pw@host``) are redacted."""
    return {k: redact(str(v)) for k, v in asdict(cfg).items()}


