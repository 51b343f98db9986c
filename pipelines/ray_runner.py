"""Run shard tasks on a pool of Ray actors, each holding the frozen encoders.

Actors (not plain tasks) so the encoders load once per worker, not once per shard. The driver
keeps every actor busy with one shard at a time and hands out the next shard as soon as one
finishes, so a slow shard never idles the pool.

Failure policy: an actor that dies (OOM kill, node loss, preemption) is replaced and its shard is
run again, up to ``max_infra_retries`` times per shard. A death while the worker was decoding a
clip (its breadcrumb, ``pipelines.crash_blame``) is blamed on that clip instead; a clip blamed
``max_clip_crashes`` times is recorded as ``crashes_worker`` on the next attempt, so one poisoned
file never blocks the job. A shard over its failure budget, a storage fault that outlasted its
retries or any exception raised by our code stops the job, after cancelling what is in flight.
Finished shards are never redone.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray
from tqdm import tqdm

from pipelines import crash_blame
from pipelines.precompute_config import PrecomputeConfig, PrecomputeError, PrecomputeReport, add_result
from pipelines.shard_decode import DecodedShard
from pipelines.shard_processor import ShardProcessor, ShardResult, WorkerSettings
from pipelines.text_stage import encode_prompts
from preprocessing.faults import TransientFault
from preprocessing.manifest import ManifestRow
from preprocessing.sample import Sample
from preprocessing.shard_reader import iter_shard
from preprocessing.shards import ShardError, ShardMarker, shard_state

# driver environment that workers must see even when Ray was started earlier in the same process
FORWARDED_ENV = ("SELVA_FAULT_EXIT_SHARD", "SELVA_FAULT_CRASH_CLIP", "SELVA_TEST_DECODE_RENDEZVOUS")
TEXT_STAGE = "text-stage"  # the fault-injection name of the text stage
INFRA_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)


def retry_base(dataset_dir: str, shard: str, retry_failed: bool) -> ShardMarker | None:
    """With ``--retry-failed``, the marker of the earlier attempt whose samples are kept: only a *done*
    shard's (marker, tar of its size, failures file). A marker whose tar was lost or cut short is no base:
    the shard is written again from scratch, as a plain rerun does."""
    if not retry_failed:
        return None
    state = shard_state(dataset_dir, shard)
    return state.marker if state.done else None


def kept_samples(dataset_dir: str, shard: str, retry_failed: bool) -> dict[str, Sample]:
    """With ``--retry-failed``, the samples an earlier attempt wrote to ``shard`` (only its recorded
    failures are decoded again); else nothing."""
    if retry_base(dataset_dir, shard, retry_failed) is None:
        return {}
    return {s.key: Sample(s.meta, s.sync_mp4, s.audio_flac, s.arrays) for s in iter_shard(dataset_dir, shard)}


class ShardWorker:
    """Ray actor: one ShardProcessor (the frozen encoders) for the actor's lifetime. The one-stage design's
    shard worker (``process``: decode, encode, write) and the two-stage design's encoder actor
    (``write_decoded``); both run the text stage."""

    def __init__(self, settings: WorkerSettings):
        device = settings.device
        if ray.get_gpu_ids():
            device = "cuda"
        self.processor = ShardProcessor(replace(settings, device=device))

    def ready(self) -> bool:
        return True

    def store_prompts(self, dataset_dir: str, prompts: list[str]) -> int:
        """Text stage (pipelines/text_stage.py): encode ``prompts`` into one chunk of the prompt store."""
        maybe_inject_fault(TEXT_STAGE)
        return self.processor.store_prompts(dataset_dir, prompts)

    def store_empty_prompt(self, dataset_dir: str) -> None:
        self.processor.store_empty_prompt(dataset_dir)

    def process(
        self, dataset_dir: str, shard: str, rows: list[ManifestRow], retry_failed: bool, media_root: str,
        crashed: dict[str, int] | None = None,
    ) -> ShardResult:
        """``dataset_dir`` and ``media_root`` come resolved from the driver (absolute paths or URLs);
        ``crashed``: keys of clips blamed for too many worker deaths, with their counts."""
        maybe_inject_fault(shard)
        reuse = kept_samples(dataset_dir, shard, retry_failed)

        def before_clip(row: ManifestRow) -> None:
            crash_blame.leave(dataset_dir, shard, row.key)
            maybe_crash_on(row)

        try:
            result = self.processor.process(dataset_dir, shard, rows, media_root, reuse, crashed, before_clip)
        finally:
            crash_blame.clear(dataset_dir, shard)  # a live worker's breadcrumb blames nothing
        result.decoder_node = result.encoder_node = ray.get_runtime_context().get_node_id()
        return result

    def write_decoded(self, dataset_dir: str, rows: list[ManifestRow], retry_failed: bool,
                      decoded: DecodedShard) -> ShardResult:
        """The two-stage design's encoder half: encode a decode task's result and write the shard."""
        maybe_inject_fault(f"encode-{decoded.shard}")
        reuse = kept_samples(dataset_dir, decoded.shard, retry_failed)
        result = self.processor.write(dataset_dir, rows, decoded, reuse)
        result.encoder_node = ray.get_runtime_context().get_node_id()
        return result


def maybe_inject_fault(task: str) -> None:
    """Fault injection for the resilience tests: ``SELVA_FAULT_EXIT_SHARD=<task>:<flag file>[,...]``
    makes the worker process die (as an OOM kill would) the first time it starts that shard (or the
    text stage, ``TEXT_STAGE``)."""
    for spec in filter(None, os.environ.get("SELVA_FAULT_EXIT_SHARD", "").split(",")):
        target, _, flag = spec.partition(":")
        if target == task and flag and not os.path.exists(flag):
            Path(flag).write_text("crashed once")
            os._exit(1)


def maybe_meet_peers(folder: str | None = None, peers: int = 2, timeout_s: float = 120.0) -> bool:
    """Test hook for "decoders run at once" without a timing race: with ``SELVA_TEST_DECODE_RENDEZVOUS=<dir>``
    a decoder that finished its shard leaves a file there and waits (at most ``timeout_s``) until ``peers``
    decoders have, so that two decodes overlap exactly when the scheduler lets them run together; a pool
    that runs one at a time shows no overlap (the first waits out the timeout alone). Only finished
    decodes meet: one killed by a poisoned clip never gets here. True when the hook is on."""
    folder = folder or os.environ.get("SELVA_TEST_DECODE_RENDEZVOUS")
    if not folder:
        return False
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{os.getpid()}-{time.time_ns()}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(Path(folder).iterdir())) < peers and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def maybe_crash_on(row: ManifestRow) -> None:
    """Fault injection for the resilience tests: ``SELVA_FAULT_CRASH_CLIP=<source id>`` kills the worker
    (SIGKILL, as the OOM killer does) every time it starts decoding that clip: a poisoned file. A real
    file that segfaults FFmpeg cannot be built on demand."""
    if os.environ.get("SELVA_FAULT_CRASH_CLIP") == row.source_id:
        os.kill(os.getpid(), signal.SIGKILL)


def run_text_stage(
    cfg: PrecomputeConfig, actors: list, rows: list[ManifestRow], report: PrecomputeReport,
    replace_actors: Callable[[list], list],
) -> list:
    """Each distinct prompt of ``rows`` encoded once per dataset, before any shard (pipelines/text_stage.py).

    A worker that dies here (OOM kill, lost node) costs a rerun of the stage on fresh actors, up to
    ``max_infra_retries`` times, as a shard's would; chunks finished before are kept, so the rerun
    encodes only what is missing. Returns the actors to go on with.
    """
    for attempt in range(1, cfg.max_infra_retries + 2):
        try:
            encoded, stored, seconds = encode_prompts(str(cfg.out), rows, actors)
        except INFRA_ERRORS as err:
            if attempt > cfg.max_infra_retries:
                raise PrecomputeError(f"text stage: a worker died {attempt} times; last error: {err}") from err
            report.infra_retries += 1
            print(f"text stage: worker died ({type(err).__name__}); retrying on new workers")
            actors = replace_actors(actors)
            continue
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if err.cause is not None else err
            raise PrecomputeError(f"text stage: {type(cause).__name__}: {cause}") from None
        report.prompts_encoded += encoded
        report.prompts_stored_before = stored
        report.timings["text"] += seconds
        return actors
    raise AssertionError("unreachable")


def shard_error(shard: str, cause: BaseException) -> str:
    """One line for a shard that stops the job, naming the shard once."""
    ours = (TransientFault, PrecomputeError, ShardError)  # messages that already say what is wrong
    text = str(cause) if isinstance(cause, ours) else f"{type(cause).__name__}: {cause}"
    if isinstance(cause, TransientFault):  # nothing of the shard was written: a rerun redoes it
        text += "; nothing of the shard was written"
    if not str(cause).startswith(shard):
        text = f"{shard}: {text}"
    return text


def init_ray(cfg: PrecomputeConfig) -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # a cluster: RAY_ADDRESS or `ray job submit` decides where. Ray keeps retrying an address that
        # does not answer, for minutes and without a word: say what it is waiting for meanwhile.
        connected = threading.Event()

        def notice() -> None:
            while not connected.wait(30.0):
                print(f"still connecting to the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']} "
                      f"(is it up, and is the address right?)", flush=True)  # fmt: skip

        threading.Thread(target=notice, name="ray-connect-notice", daemon=True).start()
        try:
            ray.init(log_to_driver=True)
        finally:
            connected.set()
    else:
        # the embedded default: a private local Ray with exactly the requested CPUs (the two-stage design's
        # encoder actors hold theirs besides the decoders'), and the encoder slots a custom resource names
        cpus = cfg.workers + (math.ceil(cfg.encoder_actors * cfg.encoder_cpus) if cfg.encoder_actors else 0)
        resources = {cfg.encoder_resource: cfg.encoder_actors} if cfg.encoder_actors and cfg.encoder_resource else None
        # address="local": always a new private Ray. Without it ray.init() joins any cluster this machine's
        # /tmp/ray/ray_current_cluster names (someone else's `ray start --head`) and then refuses num_cpus
        ray.init(address="local", num_cpus=cpus, resources=resources, include_dashboard=False, log_to_driver=True,
                 logging_level="WARNING")  # fmt: skip
    _interrupt_on_sigterm()


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's stop) ends the driver as Ctrl-C does: the MLflow run is closed as
    KILLED and "finished work is kept" printed. ray.init installs Ray's own crash handler for SIGTERM, which
    aborts with a stack dump, so ours goes in after it (driver's main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def _usable_workers(wanted: int, gpus_per_worker: float) -> int:
    """How many actors to start. A Ray of this process (no ``RAY_ADDRESS``: started by this run, or by
    an earlier one in the same process with fewer ``--workers``) has fixed CPUs, and an actor beyond
    them would wait forever: fewer are started, with a warning. A cluster may autoscale: its request
    stands (``wait_ready`` says what it is waiting for)."""
    if os.environ.get("RAY_ADDRESS") or gpus_per_worker:
        return wanted
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if 0 < cpus < wanted:
        print(f"warning: this process's Ray has {cpus} CPU(s); starting {cpus} worker(s) instead of {wanted}")
        return cpus
    return wanted


def check_placeable(per_actor: dict[str, float], count: int, what: str) -> None:
    """``count`` actors of ``per_actor`` resources against the cluster's totals. This process's own Ray
    (no ``RAY_ADDRESS``) cannot grow, so a shortfall is a PrecomputeError naming it, where the actors
    would otherwise wait forever; a cluster may autoscale, so there it is one warning line."""
    totals = ray.cluster_resources()
    short = [f"{count * amount:g} {name} (the cluster has {totals.get(name, 0):g})"
             for name, amount in per_actor.items() if amount and count * amount > totals.get(name, 0) + 1e-9]
    if not short:
        return
    text = f"{count} {what} need {', '.join(short)}"
    if not os.environ.get("RAY_ADDRESS"):
        raise PrecomputeError(f"{text}: this machine's Ray cannot provide it (a GPU share needs a GPU here; "
                              f"without one, leave out the GPU flag to encode on CPU)")
    print(f"warning: {text}; they wait until the cluster has it (an autoscaler may add nodes; without one "
          f"this run waits forever: press Ctrl-C and ask for less)", flush=True)


def free_now(custom: str | None = None) -> str:
    """``free now: 3 CPU, 0 GPU[, 1 encoder_slot]``: what an actor that waits to start is waiting for."""
    free = ray.available_resources()
    names = ["CPU", "GPU", *([custom] if custom else [])]
    return "free now: " + ", ".join(f"{free.get(name, 0):g} {name}" for name in names)


def wait_ready(actors: list, notice_s: float = 60.0, custom: str | None = None) -> None:
    """Wait until every actor has loaded its encoders; every ``notice_s`` say how many still wait (a
    cluster short of free CPUs, GPUs or the ``custom`` resource leaves actors pending, silently
    otherwise). Raises ``RayActorError`` for an actor that failed to start."""
    pending = [actor.ready.remote() for actor in actors]
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=notice_s)
        ray.get(done)
        if pending:
            print(f"waiting for {len(pending)} of {len(actors)} workers to start ({free_now(custom)})")


def connect(cfg: PrecomputeConfig, report: PrecomputeReport) -> dict:
    """Start or join Ray (timed into ``report``); returns the task and actor options that forward the
    driver's fault-injection variables (``FORWARDED_ENV``) to the workers."""
    started = time.perf_counter()
    init_ray(cfg)
    report.ray_start_seconds = time.perf_counter() - started
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


def start_pool(actors: list, every_actor: list, make_actor: Callable[[], object], report: PrecomputeReport,
               what: str, custom: str | None = None) -> Callable[[list], list]:
    """Wait for ``actors`` to load their encoders (reported apart from the steady-state run; a broken
    encoder set-up fails here, before any shard starts) and return the function that replaces dead
    actors with fresh, ready ones (each counted in ``report.encoder_builds`` and kept in ``every_actor``
    so that all are released at the end)."""
    started = time.perf_counter()
    try:
        wait_ready(actors, custom=custom)
    except ray.exceptions.RayActorError as err:
        raise PrecomputeError(f"{what} could not start (encoder set-up failed?): {err}") from None
    report.worker_start_seconds = time.perf_counter() - started

    def replace_actors(dead: list) -> list:
        for actor in dead:
            ray.kill(actor, no_restart=True)
        fresh = [make_actor() for _ in dead]
        every_actor.extend(fresh)
        report.encoder_builds += len(fresh)
        wait_ready(fresh, custom=custom)
        return fresh

    return replace_actors


def run_on_ray(
    cfg: PrecomputeConfig, todo: list[str], by_shard: dict[str, list[ManifestRow]], report: PrecomputeReport,
    media_root: str,
) -> None:
    options = connect(cfg, report)
    actor_cls = ray.remote(num_cpus=1, num_gpus=cfg.gpus_per_worker)(ShardWorker).options(**options)
    settings = cfg.worker_settings()
    workers = _usable_workers(min(cfg.workers, len(todo)), cfg.gpus_per_worker)
    check_placeable({"CPU": 1, "GPU": cfg.gpus_per_worker}, workers, "shard workers")
    actors = [actor_cls.remote(settings) for _ in range(workers)]
    every_actor = list(actors)  # replacements included, so all are released at the end
    report.encoder_builds = len(actors)
    queue = list(todo)
    attempts: dict[str, int] = {}  # unexplained worker deaths per shard (a blamed clip's are counted apart)
    crashes: dict[str, Counter[str]] = {shard: Counter() for shard in todo}  # shard -> clip key -> deaths
    in_flight: dict[ray.ObjectRef, tuple[str, object]] = {}
    total_clips = sum(len(by_shard[s]) for s in todo)
    bar = tqdm(total=total_clips, unit="clip", disable=not cfg.progress, desc="precompute", dynamic_ncols=True)

    def submit(actor) -> None:
        shard = queue.pop(0)
        crashed = {key: n for key, n in crashes[shard].items() if n >= cfg.max_clip_crashes}
        ref = actor.process.remote(str(cfg.out), shard, by_shard[shard], cfg.retry_failed, media_root, crashed)
        in_flight[ref] = (shard, actor)

    run_started = time.perf_counter()
    try:
        replace_actors = start_pool(actors, every_actor, lambda: actor_cls.remote(settings), report, "workers")

        rows = [row for shard in todo for row in by_shard[shard]]
        actors = run_text_stage(cfg, actors, rows, report, replace_actors)
        run_started = time.perf_counter()
        for actor in actors:
            if queue:
                submit(actor)
        # The first error that stops the job stops new shards only: shards already running on other
        # workers finish and are kept (a rerun would redo them otherwise), then the error is raised.
        stopping: PrecomputeError | None = None

        def stop(err: PrecomputeError) -> None:
            nonlocal stopping
            if stopping is None:
                stopping = err
                queue.clear()
                if in_flight:
                    bar.write(f"error: {err}; letting {len(in_flight)} running shard(s) finish")
            else:
                bar.write(f"error: {err}")

        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            shard, actor = in_flight.pop(ref)
            try:
                result: ShardResult = ray.get(ref)
            except INFRA_ERRORS as err:
                # Blame the clip being decoded, if any: a poisoned file kills every attempt, so its
                # deaths are bounded per clip (max_clip_crashes) rather than by the shard's budget.
                blamed = crash_blame.take(cfg.out, shard)
                if blamed is not None:
                    crashes[shard][blamed] += 1
                    report.clip_crashes += 1
                    cause = f"while decoding clip {blamed}, death {crashes[shard][blamed]} of {cfg.max_clip_crashes}"
                else:
                    attempts[shard] = attempts.get(shard, 0) + 1
                    if attempts[shard] > cfg.max_infra_retries:
                        stop(PrecomputeError(f"{shard}: worker failed {attempts[shard]} times; last error: {err}"))
                        continue
                    report.infra_retries += 1
                    cause = type(err).__name__
                ray.kill(actor, no_restart=True)
                if stopping is not None:
                    continue  # the job is ending: the shard is left for the rerun
                bar.write(f"{shard}: worker died ({cause}); retrying on a new worker")
                actor = actor_cls.remote(settings)
                every_actor.append(actor)
                report.encoder_builds += 1
                queue.insert(0, shard)
                submit(actor)
                continue
            except ray.exceptions.RayTaskError as err:
                stop(PrecomputeError(shard_error(shard, err.cause if err.cause is not None else err)))
                continue
            add_result(report, result)
            bar.update(len(by_shard[shard]))
            bar.set_postfix(shards=f"{len(report.shards_run)}/{len(todo)}", failed=report.failed)
            if queue:
                submit(actor)
        if stopping is not None:
            raise stopping
    finally:
        bar.close()
        for ref in in_flight:
            ray.cancel(ref)  # actors are killed next, which also stops their running tasks
        for actor in every_actor:
            ray.kill(actor, no_restart=True)
        report.run_seconds = time.perf_counter() - run_started
