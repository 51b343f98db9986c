"""Experiment tracking that never blocks the job: MLflow calls run on one background thread.

The job's thread only puts events on a bounded queue (:class:`Tracker`'s ``start_run``,
``log_metrics``, ``log_params``, ``set_tags``, ``log_artifact``, ``log_input``, ``close``); a daemon
thread owns the ``MlflowClient`` (:mod:`training.tracking_client`), creates the run lazily (or
continues one, for a job resumed from a checkpoint) and sends what has piled up as ``log_batch``
calls. The job learns the run's id from ``run_id`` / ``wait_run_id``, never by asking MLflow itself.
A tracking server that is down, slow or silent therefore costs the job nothing but the values
that could not be sent, which are counted and reported by ``close(deadline_s)``.

Failure policy, chosen so that a dead server is cheap:

* **Short requests.** MLflow reads its HTTP timeout and retry count from the environment at every
  request (defaults: 120 s and 7 retries with backoff, i.e. minutes per call). Its client API has
  no per-call override, so :meth:`Tracker.start_run` sets ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` to this module's values *only where the user has not set
  them*: an exported value always wins. They are process-wide (and inherited by child processes).
* **Circuit breaker.** After a failed call the tracker warns once (one line on stderr naming the
  URI and the error) and drops events without touching the network for ``retry_after_s``; the
  next event after that tries again, so a long training run survives a server restart.
* **Bounded memory.** When the queue is full the oldest event is dropped (the newest metrics are
  the ones worth keeping). The run's name and params are held apart from the queue and are never
  dropped this way.
* **Bounded exit.** ``close(deadline_s)`` waits at most ``deadline_s`` for the queue to drain and
  the run to be ended, then returns a :class:`TrackingSummary`; the thread is a daemon, so a request
  still hanging then cannot keep the process alive.

This lives in ``training/`` (the README's home of MLflow) for the DeepSpeed trainer, its main user;
``selva precompute --mlflow`` imports it too. It depends on nothing else in the project.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preprocessing.redact import redact
from training.tracking_client import DatasetSpec, ParamChange, RunClient

# MLflow's own names; the values are ours and apply only where the environment has none
TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"

_START = ("start", None)
_CLOSE = "close"


@dataclass(frozen=True)
class TrackingConfig:
    """Where to log and how hard to try.

    ``request_timeout_s`` and ``max_retries`` are used only when ``MLFLOW_HTTP_REQUEST_TIMEOUT`` /
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` are not set: one try plus one retry (a pooled connection
    that the server closed is the common transient failure) of at most 5 s each.
    """

    uri: str
    queue_size: int = 10_000  # events (one log_metrics call is one event)
    request_timeout_s: int = 5  # MLflow parses the variable as an int
    max_retries: int = 1
    retry_after_s: float = 60.0  # how long the circuit stays open after a failed call
    # where an experiment this tracker creates keeps its artifacts (None: the store's default, which for
    # a local sqlite store is ./mlruns under whatever directory the job ran in)
    artifact_location: str | None = None


def default_uri(dataset_dir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite store ``mlflow.db`` in ``dataset_dir``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(dataset_dir).resolve() / 'mlflow.db'}"


@dataclass(frozen=True)
class TrackingSummary:
    """What :meth:`Tracker.close` could confirm by its deadline. Values are single metric values,
    params, tags, dataset inputs and artifact files; ``dropped`` is every value not confirmed sent
    (queue overflow, a failed or skipped call, a param whose value changed, or still pending when
    the deadline came)."""

    uri: str
    sent: int
    dropped: int
    run_id: str | None
    error: str | None  # the first failure, one line
    finished: bool  # False: the deadline came first

    def problem(self, deadline_s: float) -> str | None:
        """One line for the user when values were dropped, else None."""
        if not self.dropped:
            return None
        why = self.error or (f"still pending at the {deadline_s:g} s deadline" if not self.finished
                             else "the queue overflowed")
        return (f"MLflow tracking at {redact(self.uri)}: {self.dropped} of {self.sent + self.dropped} values "
                f"not sent ({why})")


@dataclass
class _RunSpec:
    experiment: str
    run_name: str
    params: dict[str, str]
    tags: dict[str, str]
    resume_id: str | None  # the run to continue, else None: create one
    job: tuple[str, str] | None = None  # (tag, value) naming the job: without resume_id, its run is continued
    run_id: str | None = None  # set by the thread, under the tracker's lock


@dataclass
class _Batch:
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, ms, step
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    inputs: list[DatasetSpec] = field(default_factory=list)
    artifacts: list[tuple[str, str | None, int]] = field(default_factory=list)  # path, artifact_path, files
    close_status: str | None = None


def _one_line(err: BaseException, limit: int = 200) -> str:
    """The root cause, on one line: MLflow wraps a refused connection or a read timeout in three
    layers of messages that repeat the URL and bury the reason at the end."""
    err = _root_cause(err)
    if isinstance(err, TimeoutError):  # socket's bare "timed out" says neither what nor how long
        return f"no answer within {os.environ.get(TIMEOUT_ENV, '?')} s ({TIMEOUT_ENV})"
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _root_cause(err: BaseException) -> BaseException:
    seen = {id(err)}
    while True:  # follow `raise ... from`, implicit chaining and urllib3's MaxRetryError.reason
        reason = getattr(err, "reason", None)
        nxt = err.__cause__ or err.__context__ or (reason if isinstance(reason, BaseException) else None)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        err = nxt
    return err


class Tracker:
    """One MLflow run, logged from a background thread. Every public method returns at once
    (``close`` and ``wait_run_id`` after at most their timeout) and never raises for a tracking
    failure; the errors they do raise are the caller's mistakes, named in each docstring."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._lock = threading.Lock()  # guards the counters, the flags, the run id and every put
        self._spec: _RunSpec | None = None
        self._submitted = 0
        self._sent = 0
        self._error: str | None = None
        # one warning line per kind: "failure" (the server, or the queue it backs up), "params" and
        # "artifact" (the caller's own doing: a changed param, a file gone before its upload)
        self._warned: set[str] = set()
        self._closed = False  # close() has begun: no more events are accepted, nothing is printed
        self._abandoned = False  # close() has returned: the worker sends nothing more
        self._open_until = 0.0  # monotonic time until which calls are skipped (circuit open)
        self._done = threading.Event()
        self._run_known = threading.Event()  # the run's id is known, or never will be (thread over)
        #: set once a call has failed (after the warning, if one was printed): a health signal
        self.failed = threading.Event()
        self._thread: threading.Thread | None = None
        self._mlflow_threads: set[int] = set()

    # ---- the job's side: enqueue only -------------------------------------------------------

    def start_run(self, experiment: str, run_name: str, params: dict[str, Any] | None = None,
                  tags: dict[str, Any] | None = None, run_id: str | None = None,
                  job: tuple[str, str] | None = None) -> None:
        """Name the run and start the background thread; the run is created there, lazily.

        With ``run_id``, that existing run is continued instead (its status goes back to RUNNING;
        ``experiment`` and ``run_name`` are then unused). Params it already holds with the same
        value count as sent; one it holds with another value is not logged (MLflow refuses the
        change), counts as dropped and is named in one warning line. ``job`` = (tag, value): without
        ``run_id``, an existing run of the experiment with that tag is continued (the job's earlier part
        stopped before a checkpoint learned the run's id), else a new run is made.
        Raises RuntimeError when called twice."""
        with self._lock:
            if self._spec is not None:
                raise RuntimeError("a Tracker logs one run; start_run was already called")
            self._spec = _RunSpec(experiment, run_name, {k: str(v) for k, v in (params or {}).items()},
                                  {k: str(v) for k, v in (tags or {}).items()}, run_id, job)
            self._submitted += len(self._spec.params) + len(self._spec.tags)
        for name, value in ((TIMEOUT_ENV, self.config.request_timeout_s), (RETRIES_ENV, self.config.max_retries)):
            os.environ.setdefault(name, str(value))
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._put(_START, 0)

    @property
    def run_id(self) -> str | None:
        """The run's id once the background thread has created (or continued) it, else None."""
        with self._lock:
            return self._spec.run_id if self._spec else None

    def wait_run_id(self, timeout_s: float) -> str | None:
        """The run's id, waiting at most ``timeout_s`` seconds for the thread to create it; None at
        that deadline (the server is down or silent) or once the tracker has closed without a run.
        Raises RuntimeError before ``start_run``."""
        with self._lock:
            if self._spec is None:
                raise RuntimeError("call start_run before wait_run_id")
        self._run_known.wait(max(timeout_s, 0.0))
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Queue metric values; their timestamp is taken now, on the caller's thread."""
        ms = int(time.time() * 1000)
        self._put(("metrics", [(k, float(v), ms, step) for k, v in metrics.items()]), len(metrics))

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params (stringified now); params given to ``start_run`` are never dropped by the queue.
        A param the run already holds is handled as in ``start_run``."""
        self._put(("params", {k: str(v) for k, v in params.items()}), len(params))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue run tags (stringified now)."""
        self._put(("tags", {k: str(v) for k, v in tags.items()}), len(tags))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Queue the upload of a file, or of a folder with its name kept (``artifact_path/<name>/...``),
        into the run's artifacts under ``artifact_path`` (None: their root). Each file counts as one
        value in the summary (a folder is walked now, on the caller's thread, to count them).

        The upload happens later, on the tracker's thread, and reads the path then: pass a path the
        job will neither rewrite nor delete (a checkpoint that is replaced in place could be
        uploaded half-written). A path gone by then is skipped, counted as dropped and warned about
        once. Uploads share the thread with the metrics: those queued behind a large file wait for it.
        Raises FileNotFoundError if ``local_path`` does not exist now."""
        path = os.path.abspath(local_path)
        if os.path.isdir(path):  # the same walk MLflow uploads by (symlinked folders not followed)
            files = sum(len(names) for _, _, names in os.walk(path))
        elif os.path.exists(path):
            files = 1
        else:
            raise FileNotFoundError(f"no file or folder to log as an MLflow artifact: {path}")
        self._put(("artifact", (path, artifact_path, files)), files)

    def log_input(self, name: str, digest: str, source: str | Path, profile: dict[str, Any] | None = None,
                  context: str = "training") -> None:
        """Queue a dataset as the run's input (MLflow's Datasets view), one value in the summary.

        ``source`` is the dataset's folder or file (source type "local", made absolute) or a URI
        whose scheme becomes the source type (``s3://...``: "s3"); ``profile`` is stored as JSON
        (e.g. sample counts per split); ``context`` becomes the ``mlflow.data.context`` input tag.
        Raises ValueError if ``name`` exceeds 500 or ``digest`` 36 characters (MLflow's limits,
        checked here because a refused request would open the circuit) and TypeError if
        ``profile`` is not JSON-serialisable."""
        self._put(("input", DatasetSpec.build(name, digest, source, profile, context)), 1)

    def close(self, deadline_s: float = 10.0, status: str = "FINISHED") -> TrackingSummary:
        """Send what can be sent and end the run (``status``: FINISHED, FAILED, KILLED), waiting at
        most ``deadline_s``. From here on the tracker prints nothing (the caller reports the
        summary) and accepts nothing; a request still running is left to its daemon thread."""
        with self._lock:
            already = self._closed
            self._closed = True
        if not already and self._thread is not None:
            self._put((_CLOSE, status), 0, force=True)
        finished = self._done.wait(deadline_s) if self._thread is not None else True
        with self._lock:
            self._abandoned = True
            return TrackingSummary(self.config.uri, self._sent, self._submitted - self._sent,
                                   self._spec.run_id if self._spec else None, self._error, finished)

    @property
    def warned(self) -> bool:
        """Whether a warning line was printed (the caller then need not print the close summary too)."""
        with self._lock:
            return bool(self._warned)

    @property
    def mlflow_thread_ids(self) -> frozenset[int]:
        """Idents of the threads that called MLflow (only the tracker's own thread, by design)."""
        with self._lock:
            return frozenset(self._mlflow_threads)

    def _put(self, event: Any, n_values: int, force: bool = False) -> None:
        with self._lock:
            if self._spec is None:
                raise RuntimeError("call start_run before logging")
            if self._closed and not force:
                self._submitted += n_values  # counted as dropped: the run is over
                return
            self._submitted += n_values
            while True:
                try:
                    self._queue.put_nowait(event)
                    return
                except queue.Full:
                    try:  # drop the oldest: its values stay unsent and so count as dropped
                        self._queue.get_nowait()
                    except queue.Empty:
                        pass
                    self._warn_locked("failure", f"its queue of {self.config.queue_size} events is full; "
                                      "the oldest events are dropped")

    # ---- the background thread ---------------------------------------------------------------

    def _work(self) -> None:
        run = None
        try:
            run = RunClient(self.config.uri, self.config.artifact_location)
        except Exception as err:  # noqa: BLE001 - a broken install is one more reason not to track
            self._failed(err)
            self._run_known.set()  # no client, so never a run: wait_run_id need not wait
        while True:
            batch = self._take()
            if run is not None and self._may_call():
                try:
                    self._send(run, batch)
                except Exception as err:  # noqa: BLE001 - any failure: warn once, open the circuit
                    self._failed(err)
            if batch.close_status is not None:
                self._run_known.set()
                self._done.set()
                return

    def _take(self) -> _Batch:
        """Block for one event, then take whatever else is queued: one batch per round trip."""
        batch = _Batch()
        kind, payload = self._queue.get()
        while True:
            if kind == _CLOSE:
                batch.close_status = payload
            elif kind == "metrics":
                batch.metrics.extend(payload)
            elif kind == "params":
                batch.params.update(payload)
            elif kind == "tags":
                batch.tags.update(payload)
            elif kind == "input":
                batch.inputs.append(payload)
            elif kind == "artifact":
                batch.artifacts.append(payload)
            # "start" carries nothing: it only wakes the thread, which then creates the run
            if batch.close_status is not None:
                return batch
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                return batch

    def _may_call(self) -> bool:
        with self._lock:
            return not self._abandoned and time.monotonic() >= self._open_until

    def _send(self, run: RunClient, batch: _Batch) -> None:
        spec = self._spec
        assert spec is not None  # the thread starts in start_run
        self._record_thread()
        if run.run_id is None:
            run_id = run.open(spec.experiment, spec.run_name, spec.resume_id, spec.job)
            with self._lock:
                spec.run_id = run_id
                if spec.resume_id is not None and run_id != spec.resume_id:
                    self._warn_locked("new-run", f"has no run {spec.resume_id} to continue (another store or "
                                                 f"a copied checkpoint?): logging to a new run {run_id}")
            self._run_known.set()
            batch.params = {**spec.params, **batch.params}
            batch.tags = {**spec.tags, **batch.tags}
        params, unchanged, changes = run.split_params(batch.params)
        self._count_sent(unchanged)  # the run holds them already: confirmed
        if changes:
            self._params_changed(changes)
        run.log_batch(params, batch.tags, batch.metrics, self._count_sent)
        for dataset in batch.inputs:
            run.log_input(dataset)
            self._count_sent(1)
        for local_path, artifact_path, files in batch.artifacts:
            if not os.path.exists(local_path):  # the job's doing, not the server's: circuit stays shut
                self._caller_problem("artifact", f"skipped artifact {local_path}: gone before its upload")
                continue
            run.log_artifact(local_path, artifact_path)
            self._count_sent(files)
        if batch.close_status is not None:
            run.end(batch.close_status)

    def _params_changed(self, changes: list[ParamChange]) -> None:
        named = ", ".join(f"{c.key} (logged {c.logged!r}, now {c.refused!r})" for c in changes)
        self._caller_problem("params", f"did not log changed params (MLflow keeps a run's first value): {named}")

    def _record_thread(self) -> None:
        with self._lock:
            self._mlflow_threads.add(threading.get_ident())

    def _count_sent(self, n: int) -> None:
        with self._lock:
            self._sent += n
            self._open_until = 0.0

    def _failed(self, err: BaseException) -> None:
        with self._lock:
            self._open_until = time.monotonic() + self.config.retry_after_s
            if self._error is None:
                self._error = _one_line(err)
            self._warn_locked("failure", f"failed ({_one_line(err)}); the job goes on, unsent values are counted")
        self.failed.set()

    def _caller_problem(self, kind: str, what: str) -> None:
        """Values the caller's own input kept from being sent: counted as dropped (they were never
        counted sent), reported, but the server is fine, so the circuit stays shut."""
        with self._lock:
            if self._error is None:
                self._error = what
            self._warn_locked(kind, what)

    def _warn_locked(self, kind: str, what: str) -> None:
        # silent once close() has begun: the summary it returns carries the error, in one line
        if kind not in self._warned and not self._closed:
            self._warned.add(kind)
            print(redact(f"warning: MLflow tracking at {self.config.uri} {what}"), file=sys.stderr, flush=True)
