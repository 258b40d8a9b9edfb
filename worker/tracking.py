"""Experiment tracking: one MLflow run per job (optional; torch-free).

Turned on by a tracking URI: the ``EVOSPARSE_MLFLOW_TRACKING_URI`` setting on a service (every
job of its workers is logged), or ``evosparse prune --mlflow-uri``. The URI is an operator's
choice, never a job spec field: a spec is written by API users, and a tracking URI names where
the worker writes (a folder, a host).

What a run holds: the job spec as params (nested fields as ``search.generations``), its labels as
tags (plus ``evosparse.job_id``), ``fitness_best`` and ``fitness_mean`` with one step per search
generation, the final perplexities and sparsity as metrics, and report.json plus the model card
(README.md, when the export writes one) as artifacts. A job resumed after a worker died continues
its run (found by the job id tag) instead of starting a second one.

Needs the ``mlflow-skinny`` package (the [tracking] extra), imported only when tracking is on. A
tracking server that fails mid-job costs the job its tracking (one warning), never its result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from evosparse.pruning.errors import PruningConfigError
from evosparse.worker.hooks import RunHooks

log = logging.getLogger("evosparse.tracking")
JOB_ID_TAG = "evosparse.job_id"
# Files of a job's output folder logged as artifacts (the model card only when the export wrote one).
ARTIFACT_FILES = ("report.json", "README.md")
_RUN_STATUS = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED"}


class TrackingUnavailable(PruningConfigError):
    """Tracking was asked for, but the mlflow package is not installed."""


def _mlflow():  # noqa: ANN202 - the module mlflow.entities and the class MlflowClient
    try:
        from mlflow import entities
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingUnavailable(
            "MLflow tracking is on (a tracking URI is set) but the mlflow package is missing: "
            "pip install 'evosparse[tracking]' (mlflow-skinny), or unset the tracking URI") from None
    return entities, MlflowClient


def flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"search": {"generations": 60}}`` -> ``{"search.generations": "60"}``; labels are left to tags."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        if not prefix and key == "labels":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = "none" if value is None else str(value)
    return out


class MlflowTracker:
    """The MLflow run of one job. Every call after a tracking failure is a no-op."""

    def __init__(self, tracking_uri: str, experiment: str, spec: dict[str, Any], job_id: str | None = None):
        self.entities, client_class = _mlflow()
        self.client = client_class(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        tags = {f"label.{k}": v for k, v in (spec.get("labels") or {}).items()}
        run = None
        if job_id:
            tags[JOB_ID_TAG] = job_id
            runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'",
                                           max_results=1)
            run = runs[0] if runs else None
        if run is None:
            run = self.client.create_run(experiment_id, run_name=spec.get("name") or job_id, tags=tags)
            self.client.log_batch(run.info.run_id, params=[self.entities.Param(k, v[:6000])
                                                           for k, v in flatten(spec).items()])
        self.run_id: str = run.info.run_id
        self.broken = False

    def _safely(self, what: str, fn, *args: Any) -> None:  # noqa: ANN001
        if self.broken:
            return
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - tracking must never fail the job
            self.broken = True
            log.warning("MLflow tracking stopped (%s failed); the job goes on untracked", what, exc_info=True)

    def generation(self, record: dict) -> None:
        step, now = int(record["generation"]), int(time.time() * 1000)
        metrics = [self.entities.Metric(f"fitness_{k}", float(record[k]), now, step) for k in ("best", "mean")
                   if record.get(k) is not None]
        self._safely("logging a generation", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def outputs(self, out_dir: Path, report: dict[str, Any]) -> None:
        """The finished job's numbers (step 0) and its report and model card as artifacts."""
        now = int(time.time() * 1000)
        numbers = {f"perplexity_{k}": v for k, v in (report.get("perplexity") or {}).items()}
        numbers["global_sparsity"] = report.get("global_sparsity")
        metrics = [self.entities.Metric(k, float(v), now, 0) for k, v in numbers.items() if isinstance(v, int | float)]

        def log_all() -> None:
            self.client.log_batch(self.run_id, metrics=metrics)
            for name in ARTIFACT_FILES:
                if (Path(out_dir) / name).is_file():
                    self.client.log_artifact(self.run_id, str(Path(out_dir) / name))

        self._safely("logging the outputs", log_all)

    def finish(self, status: str) -> None:
        self._safely("ending the run", lambda: self.client.set_terminated(self.run_id, _RUN_STATUS.get(status, "FAILED")))


class TrackingHooks(RunHooks):
    """``hooks`` (the service's or the CLI's) with each search generation also sent to ``tracker``."""

    def __init__(self, hooks: RunHooks, tracker: MlflowTracker):
        self.hooks, self.tracker = hooks, tracker

    def stage(self, name: str, fraction: float, message: str = "") -> None:
        self.hooks.stage(name, fraction, message)

    def generation(self, record: dict, state: bytes) -> None:
        self.hooks.generation(record, state)
        self.tracker.generation(record)

    def should_cancel(self) -> bool:
        return self.hooks.should_cancel()
