"""The MLflow-call side of :mod:`training.tracking`: one run, driven from the tracker's own thread.

Nothing here is bounded in time or thread-safe, and every method raises what MLflow raises
(``MlflowException``, ``requests`` errors, ``OSError``): :class:`training.tracking.Tracker` calls
it only from its background thread, behind its circuit breaker, and does all the counting. MLflow
is imported inside the methods because importing it takes seconds, which the job must not wait for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# log_batch limits of the MLflow REST API, per request
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
# MLflow's limits on a dataset input (mlflow.utils.validation)
_MAX_DATASET_NAME, _MAX_DATASET_DIGEST = 500, 36


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset to log as a run input, already in the strings MLflow stores."""

    name: str
    digest: str
    source_type: str  # "local" for a path, else the URI's scheme, as MLflow's own sources name it
    source: str  # JSON: {"uri": ...}, the form MLflow's file-system dataset sources write
    profile: str | None  # JSON
    context: str  # the mlflow.data.context input tag: training, validation, ...

    @classmethod
    def build(cls, name: str, digest: str, source: str | Path, profile: dict[str, Any] | None,
              context: str) -> DatasetSpec:
        """From a path (source type "local", made absolute) or a URI (its scheme is the type).
        No MLflow call. Raises ValueError past MLflow's name/digest lengths, TypeError for a
        profile that is not JSON-serialisable."""
        if len(name) > _MAX_DATASET_NAME or len(digest) > _MAX_DATASET_DIGEST:
            raise ValueError(f"MLflow stores a dataset name of at most {_MAX_DATASET_NAME} and a digest of "
                             f"at most {_MAX_DATASET_DIGEST} characters: {name!r}, {digest!r}")
        text = str(source)
        scheme = text.split("://", 1)[0] if "://" in text else ""
        if scheme in ("", "file"):
            source_type, uri = "local", text if scheme else os.path.abspath(text)
        else:
            source_type, uri = scheme, text
        return cls(name, digest, source_type, json.dumps({"uri": uri}),
                   None if profile is None else json.dumps(profile, sort_keys=True), context)


@dataclass(frozen=True)
class ParamChange:
    """A param the run already holds with another value (MLflow refuses to change it)."""

    key: str
    logged: str
    refused: str


class RunClient:
    """An ``MlflowClient`` and the run it logs to, created or continued by :meth:`open`."""

    def __init__(self, uri: str, artifact_location: str | None) -> None:
        if uri.startswith("sqlite:///"):  # the dataset folder may not exist yet
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(uri)
        self._artifact_location = artifact_location
        self.run_id: str | None = None
        self._params: dict[str, str] = {}  # what the run holds, to log only new or unchanged params

    def open(self, experiment: str, run_name: str, run_id: str | None, job: tuple[str, str] | None = None) -> str:
        """Create a run named ``run_name`` in ``experiment`` (created if missing) or, given
        ``run_id``, continue that run: its status goes back to RUNNING and its name and experiment
        stay as they are. Returns the run's id. An id this store does not hold (the job resumed against
        another tracking server, or from a checkpoint copied from another run) starts a new run tagged
        ``continues_run=<id>``: the caller sees the new id differ from the one it asked for.
        ``job`` = (tag, value): without ``run_id``, a run of ``experiment`` with that tag is continued
        (a job stopped before its first checkpoint learned the run's id); else a new run is made."""
        from mlflow.exceptions import MlflowException

        if run_id is None and job is not None:
            found = self._client.search_runs([self._experiment_id(experiment)],
                                             filter_string=f"tags.{job[0]} = '{job[1]}'", max_results=1)
            run_id = found[0].info.run_id if found else None
        if run_id is not None:
            try:
                run = self._client.get_run(run_id)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                new = self._client.create_run(self._experiment_id(experiment), run_name=run_name,
                                              tags={"continues_run": run_id})
                self.run_id = new.info.run_id
                return self.run_id
            self._client.update_run(run_id, status="RUNNING")
            self._params = dict(run.data.params)
        else:
            run_id = self._client.create_run(self._experiment_id(experiment), run_name=run_name).info.run_id
        self.run_id = run_id
        return run_id

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(name, self._artifact_location)
        except MlflowException:  # another process created it first
            found = self._client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def split_params(self, params: dict[str, str]) -> tuple[dict[str, str], int, list[ParamChange]]:
        """Sort ``params`` against what the run holds: (the new ones, to log; how many it already
        holds with the same value; the changed ones, which MLflow would refuse)."""
        new = {k: v for k, v in params.items() if k not in self._params}
        changes = [ParamChange(k, self._params[k], v) for k, v in params.items()
                   if k in self._params and self._params[k] != v]
        return new, len(params) - len(new) - len(changes), changes

    def log_batch(self, params: dict[str, str], tags: dict[str, str],
                  metrics: list[tuple[str, float, int, int]], sent: Callable[[int], None]) -> None:
        """Send in chunks within the REST API's per-request limits, calling ``sent(n)`` after each.
        ``metrics`` holds (key, value, timestamp in ms, step)."""
        from mlflow.entities import Metric, Param, RunTag

        kinds = (("params", [Param(k, v) for k, v in params.items()], _MAX_PARAMS),
                 ("tags", [RunTag(k, v) for k, v in tags.items()], _MAX_TAGS),
                 ("metrics", [Metric(k, v, ms, step) for k, v, ms, step in metrics], _MAX_METRICS))
        for name, items, limit in kinds:
            for i in range(0, len(items), limit):
                chunk = items[i:i + limit]
                # synchronous: MLflow's own async queue would flush at exit without our deadline
                self._client.log_batch(self.run_id, **{name: chunk}, synchronous=True)
                if name == "params":
                    self._params.update((p.key, p.value) for p in chunk)
                sent(len(chunk))

    def log_artifact(self, local_path: str, artifact_path: str | None) -> None:
        """Upload a file, or a folder with its name kept (``artifact_path/<folder name>/...``)."""
        self._client.log_artifact(self.run_id, local_path, artifact_path)

    def log_input(self, dataset: DatasetSpec) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        entity = Dataset(dataset.name, dataset.digest, dataset.source_type, dataset.source,
                         profile=dataset.profile)
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, dataset.context)]
        self._client.log_inputs(self.run_id, [DatasetInput(entity, tags)])

    def end(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status)
