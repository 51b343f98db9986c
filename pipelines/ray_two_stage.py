"""The two-stage precompute design: CPU decode tasks feeding a few encoder actors (``--encoder-actors``).

Why: in the one-stage pool (``pipelines.ray_runner``) every worker holds one CPU and its own copy of
every encoder, fed one clip batch at a time; on a node with 8 GPUs and 96 cores that is 96 copies of
FLAN-T5, CLIP and the VAE. Here decoding and compaction (FFmpeg, ``sync.mp4``, FLAC: CPU work) run as
plain Ray tasks, one per shard, ``--workers`` at a time, and send their result (waveforms and the
compacted files, not the frames) to G encoder actors, one per GPU (``--gpus-per-encoder``) or per unit
of a custom resource (``--encoder-resource``). The actor encodes the shard's clips in batches fixed by
the manifest (consecutive runs of ``--batch-size`` clips in shard order, whatever the scheduling) and
writes the shard, so one task's output is still one shard, with the same markers, resume and failure
records as the one-stage design, and the same bytes (docs/shard-format.md, tested).

Failure policy, as the one-stage runner's: a decode task whose process dies while decoding a clip
blames that clip (``pipelines.crash_blame``; ``crashes_worker`` after ``max_clip_crashes`` deaths); an
unexplained death reruns the shard, up to ``max_infra_retries`` times. An encoder actor that dies is
replaced and the shard re-encoded from the same decoded result (decoded again if that was lost). A
shard over its failure budget, a storage fault that outlasted its retries or an error of our code stops
the job after the shards being written finish. At most ``workers + 2 G`` decoded shards wait in Ray's
object store at once, so a slow encoder slows the decoders instead of filling memory.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

import ray
from tqdm import tqdm

from pipelines import crash_blame
from pipelines.precompute_config import PrecomputeConfig, PrecomputeError, PrecomputeReport, add_result
from pipelines.ray_runner import (
    INFRA_ERRORS,
    ShardWorker,
    check_placeable,
    connect,
    free_now,
    maybe_crash_on,
    maybe_inject_fault,
    maybe_meet_peers,
    retry_base,
    run_text_stage,
    shard_error,
    start_pool,
)
from pipelines.shard_decode import ClipDecoder, DecodedShard, DecodeSettings
from preprocessing.manifest import ManifestRow


def decode_task(settings: DecodeSettings, dataset_dir: str, shard: str, rows: list[ManifestRow],
                media_root: str, retry_failed: bool, crashed: dict[str, int]) -> tuple[dict, DecodedShard]:
    """Ray task: decode and compact ``shard``. Returns a small summary (the driver reads it to see the
    task succeeded without fetching the waveforms) and the decoded shard (passed on by reference)."""
    maybe_inject_fault(f"decode-{shard}")
    # --retry-failed: the keys an earlier attempt wrote, from its marker (the encoder actor reads the samples)
    marker = retry_base(dataset_dir, shard, retry_failed)
    skip = frozenset(marker.keys) if marker is not None else frozenset()

    def before_clip(row: ManifestRow) -> None:
        crash_blame.leave(dataset_dir, shard, row.key)
        maybe_crash_on(row)

    try:
        decoded = ClipDecoder(settings).decode_shard(shard, rows, media_root, skip, crashed, before_clip)
    finally:
        crash_blame.clear(dataset_dir, shard)
    if maybe_meet_peers():  # test hook: the wait is part of the task's time on its CPU
        decoded.ended = time.time()
    decoded.node = ray.get_runtime_context().get_node_id()
    return {"clips": len(decoded.clips), "failures": len(decoded.failures)}, decoded


@dataclass
class _Encoding:
    shard: str
    actor: object
    decoded: ray.ObjectRef


def run_two_stage(
    cfg: PrecomputeConfig, todo: list[str], by_shard: dict[str, list[ManifestRow]], report: PrecomputeReport,
    media_root: str,
) -> None:
    options = connect(cfg, report)
    report.design = "two-stage"
    slot = {cfg.encoder_resource: 1} if cfg.encoder_resource else {}
    encoder_cls = ray.remote(ShardWorker).options(num_cpus=cfg.encoder_cpus, num_gpus=cfg.gpus_per_encoder,
                                                  resources=slot, **options)  # fmt: skip
    # max_retries=0: a dead decoder is the driver's to explain (a blamed clip, or an infrastructure retry)
    decode = ray.remote(decode_task).options(num_cpus=1, num_returns=2, max_retries=0, **options)
    settings = cfg.worker_settings()
    decode_settings = settings.decode_settings()
    out = str(cfg.out)

    count = min(cfg.encoder_actors, len(todo))
    check_placeable({"CPU": cfg.encoder_cpus, "GPU": cfg.gpus_per_encoder, **slot}, count, "encoder actors")
    actors = [encoder_cls.remote(settings) for _ in range(count)]
    every_actor = list(actors)
    report.encoder_builds = len(actors)
    queue: deque[str] = deque(todo)
    decoding: dict[ray.ObjectRef, tuple[str, ray.ObjectRef]] = {}  # summary ref -> (shard, payload ref)
    waiting: deque[tuple[str, ray.ObjectRef]] = deque()  # decoded shards for the next free encoder
    encoding: dict[ray.ObjectRef, _Encoding] = {}
    attempts: Counter[str] = Counter()  # unexplained deaths per shard
    crashes: dict[str, Counter[str]] = {shard: Counter() for shard in todo}
    bar = tqdm(total=sum(len(by_shard[s]) for s in todo), unit="clip", disable=not cfg.progress, desc="precompute",
               dynamic_ncols=True)  # fmt: skip
    ahead = cfg.workers + 2 * len(actors)  # decoded or decoding shards allowed at once

    starting: dict[ray.ObjectRef, object] = {}  # ready() ref -> replacement actor not yet able to take work

    def new_actor() -> None:
        """Start a replacement; it takes shards only once ready (a node lost with its actor may leave the
        replacement unplaceable for a while: the shard it would have held goes to a live actor meanwhile)."""
        actor = encoder_cls.remote(settings)
        every_actor.append(actor)
        report.encoder_builds += 1
        starting[actor.ready.remote()] = actor

    run_started = time.perf_counter()
    try:
        replace_actors = start_pool(actors, every_actor, lambda: encoder_cls.remote(settings), report,
                                    "encoder actors", cfg.encoder_resource)

        rows = [row for shard in todo for row in by_shard[shard]]
        idle = list(run_text_stage(cfg, actors, rows, report, replace_actors))
        run_started = time.perf_counter()
        stopping: PrecomputeError | None = None

        def stop(err: PrecomputeError) -> None:
            nonlocal stopping
            if stopping is None:
                stopping = err
                queue.clear()
                waiting.clear()
                for ref in decoding:  # nothing of theirs is written: the rerun decodes them
                    ray.cancel(ref)
                decoding.clear()
                if encoding:
                    bar.write(f"error: {err}; letting {len(encoding)} shard(s) being written finish")
            else:
                bar.write(f"error: {err}")

        def infra_retry(shard: str, err: BaseException) -> bool:
            """Count an unexplained death of ``shard``'s task; False (and the job stops) past the budget."""
            attempts[shard] += 1
            if attempts[shard] > cfg.max_infra_retries:
                stop(PrecomputeError(f"{shard}: worker failed {attempts[shard]} times; last error: {err}"))
                return False
            report.infra_retries += 1
            return True

        while True:
            while queue and len(decoding) < cfg.workers and len(decoding) + len(waiting) < ahead:
                shard = queue.popleft()
                crashed = {key: n for key, n in crashes[shard].items() if n >= cfg.max_clip_crashes}
                summary, payload = decode.remote(decode_settings, out, shard, by_shard[shard], media_root,
                                                 cfg.retry_failed, crashed)  # fmt: skip
                decoding[summary] = (shard, payload)
            while idle and waiting:
                shard, payload = waiting.popleft()
                actor = idle.pop()
                ref = actor.write_decoded.remote(out, by_shard[shard], cfg.retry_failed, payload)
                encoding[ref] = _Encoding(shard, actor, payload)
            if not decoding and not encoding and not (waiting and starting):
                break
            ready, _ = ray.wait([*decoding, *encoding, *starting], num_returns=1, timeout=60.0)
            if not ready:  # a minute without news: long decodes are normal, replacements that cannot start are not
                if starting and waiting and not idle:
                    bar.write(f"waiting for {len(starting)} replacement encoder actor(s) to start, {len(waiting)} "
                              f"decoded shard(s) queued ({free_now(cfg.encoder_resource)})")
                continue
            ref = ready[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    ray.kill(actor, no_restart=True)
                    stop(PrecomputeError(f"a replacement encoder actor could not start: {err}"))
                    continue
                idle.append(actor)
                continue
            if ref in decoding:
                shard, payload = decoding.pop(ref)
                try:
                    ray.get(ref)
                except INFRA_ERRORS as err:
                    blamed = crash_blame.take(cfg.out, shard)
                    if blamed is not None:
                        crashes[shard][blamed] += 1
                        report.clip_crashes += 1
                        deaths = crashes[shard][blamed]
                        cause = f"while decoding clip {blamed}, death {deaths} of {cfg.max_clip_crashes}"
                    elif infra_retry(shard, err):
                        cause = type(err).__name__
                    else:
                        continue
                    if stopping is None:
                        bar.write(f"{shard}: decoder died ({cause}); decoding it again")
                        queue.appendleft(shard)
                    continue
                except ray.exceptions.RayTaskError as err:
                    stop(PrecomputeError(shard_error(shard, err.cause if err.cause is not None else err)))
                    continue
                if stopping is None:
                    waiting.append((shard, payload))
                continue
            job = encoding.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                ray.kill(job.actor, no_restart=True)
                new_actor()
                if infra_retry(job.shard, err) and stopping is None:
                    bar.write(f"{job.shard}: encoder actor died ({type(err).__name__}); writing it on a new one")
                    waiting.appendleft((job.shard, job.decoded))
                continue
            except INFRA_ERRORS as err:  # the decoded result was lost with its node: decode it again
                idle.append(job.actor)
                if infra_retry(job.shard, err) and stopping is None:
                    bar.write(f"{job.shard}: its decoded clips were lost ({type(err).__name__}); decoding again")
                    queue.appendleft(job.shard)
                continue
            except ray.exceptions.RayTaskError as err:
                idle.append(job.actor)
                stop(PrecomputeError(shard_error(job.shard, err.cause if err.cause is not None else err)))
                continue
            idle.append(job.actor)
            add_result(report, result)
            bar.update(len(by_shard[job.shard]))
            bar.set_postfix(shards=f"{len(report.shards_run)}/{len(todo)}", failed=report.failed)
        if stopping is not None:
            raise stopping
    finally:
        bar.close()
        for ref in [*decoding, *encoding]:
            ray.cancel(ref)
        starting.clear()
        for actor in every_actor:
            ray.kill(actor, no_restart=True)
        report.run_seconds = time.perf_counter() - run_started
