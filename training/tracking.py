"""Experiment tracking that never blocks the job: MLflow calls run on one background thread.

The job's thread only puts events on a bounded queue (:class:`Tracker`'s ``start_run``,
``log_metrics``, ``log_params``, ``set_tags``, ``close``); a daemon thread owns the
``MlflowClient``, creates the run lazily and sends what has piled up as ``log_batch`` calls.
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

# MLflow's own names; the values are ours and apply only where the environment has none
TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"

# log_batch limits of the MLflow REST API, per request
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100

_START = "start"
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
    params and tags; ``dropped`` is every value not confirmed sent (queue overflow, a failed or
    skipped call, or still pending when the deadline came)."""

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
        return (f"MLflow tracking at {self.uri}: {self.dropped} of {self.sent + self.dropped} values "
                f"not sent ({why})")


@dataclass
class _RunSpec:
    experiment: str
    run_name: str
    params: dict[str, str]
    tags: dict[str, str]
    run_id: str | None = None


@dataclass
class _Batch:
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, ms, step
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    close_status: str | None = None

    def size(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)


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
    (``close`` after at most its deadline) and never raises for a tracking failure."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._lock = threading.Lock()  # guards the counters, the flags and every put
        self._spec: _RunSpec | None = None
        self._submitted = 0
        self._sent = 0
        self._error: str | None = None
        self._warned = False
        self._closed = False  # close() has begun: no more events are accepted, nothing is printed
        self._abandoned = False  # close() has returned: the worker sends nothing more
        self._open_until = 0.0  # monotonic time until which calls are skipped (circuit open)
        self._done = threading.Event()
        #: set once a call has failed (after the warning, if one was printed): a health signal
        self.failed = threading.Event()
        self._thread: threading.Thread | None = None
        self._mlflow_threads: set[int] = set()

    # ---- the job's side: enqueue only -------------------------------------------------------

    def start_run(self, experiment: str, run_name: str, params: dict[str, Any] | None = None,
                  tags: dict[str, Any] | None = None) -> None:
        """Name the run and start the background thread; the run is created there, lazily."""
        with self._lock:
            if self._spec is not None:
                raise RuntimeError("a Tracker logs one run; start_run was already called")
            self._spec = _RunSpec(experiment, run_name, {k: str(v) for k, v in (params or {}).items()},
                                  {k: str(v) for k, v in (tags or {}).items()})
            self._submitted += len(self._spec.params) + len(self._spec.tags)
        for name, value in ((TIMEOUT_ENV, self.config.request_timeout_s), (RETRIES_ENV, self.config.max_retries)):
            os.environ.setdefault(name, str(value))
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._put(_START, 0)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Queue metric values; their timestamp is taken now, on the caller's thread."""
        ms = int(time.time() * 1000)
        self._put(("metrics", [(k, float(v), ms, step) for k, v in metrics.items()]), len(metrics))

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params (stringified now); params given to ``start_run`` are never dropped by the queue."""
        self._put(("params", {k: str(v) for k, v in params.items()}), len(params))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue run tags (stringified now)."""
        self._put(("tags", {k: str(v) for k, v in tags.items()}), len(tags))

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
                    self._warn_locked(f"its queue of {self.config.queue_size} events is full; "
                                      "the oldest events are dropped")

    # ---- the background thread ---------------------------------------------------------------

    def _work(self) -> None:
        client = None
        try:
            if self.config.uri.startswith("sqlite:///"):  # the dataset folder may not exist yet
                Path(self.config.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            # imported here: MLflow takes seconds to import, which the job should not wait for
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.config.uri)
        except Exception as err:  # noqa: BLE001 - a broken install is one more reason not to track
            self._failed(err)
        while True:
            batch = self._take()
            if client is not None and self._may_call():
                try:
                    self._send(client, batch)
                except Exception as err:  # noqa: BLE001 - any failure: warn once, open the circuit
                    self._failed(err)
            if batch.close_status is not None:
                self._done.set()
                return

    def _take(self) -> _Batch:
        """Block for one event, then take whatever else is queued: one batch per round trip."""
        batch = _Batch()
        event = self._queue.get()
        while True:
            if event == _START:
                pass
            elif event[0] == _CLOSE:
                batch.close_status = event[1]
            elif event[0] == "metrics":
                batch.metrics.extend(event[1])
            elif event[0] == "params":
                batch.params.update(event[1])
            else:
                batch.tags.update(event[1])
            if batch.close_status is not None:
                return batch
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return batch

    def _may_call(self) -> bool:
        with self._lock:
            return not self._abandoned and time.monotonic() >= self._open_until

    def _send(self, client: Any, batch: _Batch) -> None:
        from mlflow.entities import Metric, Param, RunTag

        spec = self._spec
        assert spec is not None  # the thread starts in start_run
        self._record_thread()
        if spec.run_id is None:
            spec.run_id = self._create_run(client, spec)
            batch.params = {**spec.params, **batch.params}
            batch.tags = {**spec.tags, **batch.tags}
        params = [Param(k, v) for k, v in batch.params.items()]
        tags = [RunTag(k, v) for k, v in batch.tags.items()]
        metrics = [Metric(k, v, ms, step) for k, v, ms, step in batch.metrics]
        for items, limit, name in ((params, _MAX_PARAMS, "params"), (tags, _MAX_TAGS, "tags"),
                                   (metrics, _MAX_METRICS, "metrics")):
            for i in range(0, len(items), limit):
                chunk = items[i:i + limit]
                # synchronous: MLflow's own async queue would flush at exit without our deadline
                client.log_batch(spec.run_id, **{name: chunk}, synchronous=True)
                self._count_sent(len(chunk))
        if batch.close_status is not None:
            client.set_terminated(spec.run_id, batch.close_status)

    def _create_run(self, client: Any, spec: _RunSpec) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(spec.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(spec.experiment, self.config.artifact_location)
            except MlflowException:  # another process created it first
                found = client.get_experiment_by_name(spec.experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        return client.create_run(experiment_id, run_name=spec.run_name).info.run_id

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
            self._warn_locked(f"failed ({_one_line(err)}); the job goes on, unsent values are counted")
        self.failed.set()

    def _warn_locked(self, what: str) -> None:
        # silent once close() has begun: the summary it returns carries the error, in one line
        if not self._warned and not self._closed:
            self._warned = True
            print(f"warning: MLflow tracking at {self.config.uri} {what}", file=sys.stderr, flush=True)
