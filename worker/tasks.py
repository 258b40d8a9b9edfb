"""The Celery task that runs one pruning job, and the reaper that rescues jobs of dead workers.

Life of a job attempt:
1. claim the job row atomically (QUEUED -> RUNNING, new lease token); a finished job, or one that a
   live attempt holds, is left alone, so a redelivered or duplicated message does nothing;
2. run ``worker.runner.run_job`` with hooks that write progress and every search generation to
   the database (the generation row and the search state after it in one transaction), keep a
   heartbeat, and read the cancel flag;
3. publish the output folder to the object store atomically, then record artifacts and SUCCEEDED
   in one transaction; any error ends in FAILED with a message the user can act on, a cancel in
   CANCELLED with the history kept;
4. fire the completion webhook.

If the worker dies (SIGKILL, OOM killer), its heartbeat stops. The reaper thread in every worker's
main process puts such a job back to QUEUED and enqueues it again; the next attempt resumes from
the last checkpointed search state. After ``max_attempts`` deaths the job is FAILED.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import setup_logging, worker_init, worker_ready, worker_shutting_down
from evosparse.jobs import repo
from evosparse.jobs.db import sessionmaker_for
from evosparse.jobs.log import configure_logging, job_context
from evosparse.jobs.models import TERMINAL, Job, utcnow
from evosparse.jobs.settings import Settings, get_settings
from evosparse.jobs.spec import JobSpec
from evosparse.jobs.store import Store, store_from_settings
from evosparse.jobs.validation import SpecRejected, check_spec
from evosparse.pruning.errors import CancelledError, EvosparseError
from evosparse.worker.celery_app import app
from sqlalchemy import select, update

log = logging.getLogger("evosparse.worker")

try:  # the runner imports torch; the hooks only need its base class
    from evosparse.worker.runner import RunHooks
except ImportError:  # pragma: no cover - runner not installed yet
    RunHooks = object  # type: ignore[misc,assignment]


# The job row's search_state holds this prefix + the object-store key of the state, not the state:
# the state (with the whole score cache) goes to the object store, one object per generation.
STATE_REF = b"evosparse-store:"


def state_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/search-state"


def resume_state(raw: bytes | None, store: Store) -> bytes | None:
    """The search state a claim resumes from: read from the store (older rows hold the bytes themselves)."""
    if raw is None or not raw.startswith(STATE_REF):
        return raw
    return store.get(raw[len(STATE_REF):].decode())


class ServiceHooks(RunHooks):  # type: ignore[misc,valid-type]
    """RunHooks that persist progress/generations and read the cancel flag, under this attempt's lease.

    Each generation: its state object is written to the store first, then the generation row and
    the state's key in one transaction, then the previous state object is deleted. So the row
    always names a state that exists, and the store holds at most two states per job.
    """

    def __init__(self, claim: repo.Claim, settings: Settings, min_interval_s: float = 0.5,
                 store: Store | None = None):
        self.claim = claim
        self.store = store
        self._state_key: str | None = None
        self.sessions = sessionmaker_for(settings.resolved_database_url)
        self.min_interval_s = min_interval_s
        self.lost = False  # another attempt took the job over: stop without touching it
        self._last_stage: tuple[str, float] = ("", 0.0)
        self.current_stage = "start"

    def stage(self, name: str, fraction: float, message: str = "") -> None:
        self.current_stage = name
        now = time.monotonic()
        if name == self._last_stage[0] and now - self._last_stage[1] < self.min_interval_s and fraction < 1.0:
            return  # throttle chatty progress to a few writes per second
        self._last_stage = (name, now)
        frac = min(max(float(fraction), 0.0), 1.0) if math.isfinite(fraction) else 0.0
        with self.sessions() as db:
            if not repo.leased_update(db, self.claim, stage=name[:100], progress=frac,
                                      message=(message or "")[:500] or None, heartbeat_at=utcnow()):
                self.lost = True

    def generation(self, record: dict, state: bytes) -> None:
        key = None
        if self.store is not None:
            gen = int(record.get("generation", 0))
            key = f"{state_prefix(self.claim.job_id)}/{self.claim.attempt}-{gen:06d}"
            self.store.put_bytes(state, f"{key}/state.json")
            state = STATE_REF + f"{key}/state.json".encode()
        with self.sessions() as db:
            if not repo.record_generation(db, self.claim, record, state):
                self.lost = True
                return
        if self._state_key is not None and self.store is not None:
            self.store.delete_prefix(self._state_key)
        self._state_key = key

    def should_cancel(self) -> bool:
        if self.lost:
            return True
        with self.sessions() as db:
            flag = repo.is_cancel_requested(db, self.claim)
        if flag is None:
            self.lost = True
            return True
        return flag


class Heartbeat(threading.Thread):
    """Refreshes heartbeat_at while the job runs, so long stages (model load, pruning) look alive."""

    def __init__(self, hooks: ServiceHooks, interval_s: float):
        super().__init__(daemon=True, name="evosparse-heartbeat")
        self.hooks, self.interval_s = hooks, interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                with self.hooks.sessions() as db:
                    if not repo.leased_update(db, self.hooks.claim, heartbeat_at=utcnow()):
                        self.hooks.lost = True
                        return
            except Exception:  # a database blip must not kill the job; the next beat retries
                log.warning("heartbeat failed", exc_info=True)

    def stop(self) -> None:
        self.stop_event.set()


def _json_safe(obj: object) -> object:
    """Round-trip through JSON with NaN/inf replaced by null (PostgreSQL JSON rejects them)."""
    def clean(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x
    return clean(json.loads(json.dumps(obj, default=str)))


def _failure_message(exc: BaseException, settings: Settings, stage: str = "", model: str = "") -> str:
    if isinstance(exc, SpecRejected | EvosparseError):
        return str(exc)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
    if stage in ("start", "load") and not isinstance(exc, MemoryError | SoftTimeLimitExceeded):
        # Anything that breaks while reading the checkpoint is, for the user, an unloadable model.
        return f"could not load model {model!r}: {type(exc).__name__}: {first_line}"
    if isinstance(exc, SoftTimeLimitExceeded):
        return (f"the job exceeded this server's time limit of {settings.task_time_limit_s} s; "
                f"lower search.generations or set search.time_budget_min")
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return ("ran out of memory; use fewer calib/eval windows, a shorter seq_len, dtype bfloat16, "
                "or a smaller model")
    return (f"internal error ({type(exc).__name__}: {exc}); resubmit the job, and report it if it "
            f"happens again")[:2000]


def _worker_name(task) -> str:  # noqa: ANN001
    host = getattr(task.request, "hostname", None) or socket.gethostname()
    return f"{host}:{os.getpid()}"[:200]


@app.task(name="evosparse.run_job", bind=True)
def run_job_task(self, job_id: str) -> str:  # noqa: ANN001
    with job_context(job_id):  # every log line of this task carries the job id
        settings = get_settings()
        sessions = sessionmaker_for(settings.resolved_database_url)
        with sessions() as db:
            claim = repo.claim_job(db, job_id, _worker_name(self), settings.stale_after_s, settings.max_attempts)
        if isinstance(claim, str):
            log.info("job %s not run: %s", job_id, claim)
            if claim == "exhausted":
                _fire_webhook(job_id, settings)
            return claim
        outcome = execute(claim, settings)
        if outcome != "lost":
            _fire_webhook(job_id, settings)
        return outcome


def execute(claim: repo.Claim, settings: Settings) -> str:
    """Run one attempt of a claimed job to a terminal state (or 'lost' if superseded)."""
    from evosparse.worker.runner import run_job  # heavy (torch): imported in the process that runs the job

    sessions = sessionmaker_for(settings.resolved_database_url)
    _lower_priority(settings)
    store = store_from_settings(settings)
    hooks = ServiceHooks(claim, settings, store=store)
    beat = Heartbeat(hooks, settings.heartbeat_s)
    beat.start()
    work = settings.resolved_work_dir / f"{claim.job_id}-{claim.attempt}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    old_cwd = os.getcwd()
    status, error, report, objects, prefix = "FAILED", None, None, None, None
    try:
        spec = check_spec(JobSpec.model_validate(claim.spec), settings)  # paths re-checked at run time
        os.chdir(work)  # relative paths in a spec must not reach the worker's own folder
        if claim.resume_state is not None:
            log.info("job %s attempt %d resumes after generation %s", claim.job_id, claim.attempt,
                     claim.resume_generation)
        levels = level_store(settings)
        report = run_job(spec, work / "out", hooks, resume_state=resume_state(claim.resume_state, store),
                         levels=levels,
                         scoring=scoring_for(f"evosparse:score:{claim.job_id}:{claim.attempt}", spec, settings,
                                             levels))
        if hooks.lost:
            return "lost"
        hooks.stage("upload", 0.99, "publishing artifacts")
        prefix = f"jobs/{claim.job_id}/attempt-{claim.attempt}"
        objects = store.put_dir(work / "out", prefix)
        status, report = "SUCCEEDED", _json_safe(report)
    except CancelledError as exc:
        if hooks.lost:
            return "lost"
        status, error = "CANCELLED", str(exc) or "cancelled by its owner"
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job, never leave it RUNNING
        if hooks.lost:
            return "lost"
        if not isinstance(exc, Exception | SoftTimeLimitExceeded):
            raise  # SystemExit/KeyboardInterrupt: the worker is going down, the reaper will requeue
        log.exception("job %s failed", claim.job_id)
        status, error = "FAILED", _failure_message(exc, settings, hooks.current_stage,
                                                   str(claim.spec.get("model", "")))
    finally:
        beat.stop()
        os.chdir(old_cwd)
        shutil.rmtree(work, ignore_errors=True)
    with sessions() as db:
        if not repo.finish_job(db, claim, status, error=error, report=report, artifacts=objects,
                               artifact_prefix=prefix):
            return "lost"
    try:  # a finished job resumes no more: its search states go (the generations stay in the database)
        store.delete_prefix(state_prefix(claim.job_id))
    except Exception:  # noqa: BLE001 - leftover state objects are harmless
        log.warning("could not delete the search states of job %s", claim.job_id, exc_info=True)
    return status


def level_store(settings: Settings):  # noqa: ANN201 - worker.leveldb_store.LevelStore (imports torch)
    """Level databases in the object store, with a local copy per machine under the work folder."""
    from evosparse.worker.leveldb_store import LevelStore

    return LevelStore(store_from_settings(settings), settings.resolved_work_dir / "leveldb")


def scoring_for(namespace: str, spec: JobSpec, settings: Settings, levels):  # noqa: ANN001, ANN201
    """A factory that fans the job's search out to scoring workers, or None for in-process scoring.

    ``namespace`` names this job attempt in Redis (scorers key their warm state by it).
    """
    if spec.allocation != "evolutionary" or spec.search.workers <= 1:
        return None
    from evosparse.worker.scoring import DistributedFitness, redis_from_url

    def make(local):  # noqa: ANN001, ANN202
        if levels.last_key is None:  # nothing stored for scorers to load: score here
            return local
        connection = app.connection_for_write(settings.broker_url)

        def send(context: dict, batch: str) -> None:
            # A wake-up nobody took within the lease's reach is stale: the coordinator scored that stage.
            app.send_task("evosparse.score", args=[context, batch], queue=settings.score_queue,
                          connection=connection, expires=max(60.0, 30 * settings.scoring_lease_s))

        context = {"namespace": namespace, "spec": spec.model_dump(mode="json"), "leveldb_key": levels.last_key}
        return DistributedFitness(local, redis_from_url(settings.broker_url), namespace, context,
                                  spec.search.workers, send, settings.scoring_lease_s, on_close=connection.release)

    return make


@app.task(name="evosparse.score", acks_late=False, ignore_result=True)
def score_task(context: dict, batch: str) -> int:
    """Wake-up of a scoring worker: score candidates of one selection stage (worker/scoring.py)."""
    from evosparse.worker.scoring import redis_from_url, score_batch

    settings = get_settings()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    with job_context(str(context.get("namespace", "")).removeprefix("evosparse:score:").split(":")[0] or None):
        return score_batch(context, batch, redis_from_url(settings.broker_url), level_store(settings),
                           settings.scoring_lease_s)


def _lower_priority(settings: Settings) -> None:
    """Batch work yields to the API on a shared machine (the pool process is fresh for each job)."""
    try:
        if settings.worker_nice and os.getpid() != _MAIN_PID:
            os.nice(settings.worker_nice)
    except OSError:
        pass
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


_MAIN_PID = os.getpid()


def _fire_webhook(job_id: str, settings: Settings) -> None:
    from evosparse.jobs.webhook import deliver

    sessions = sessionmaker_for(settings.resolved_database_url)
    with sessions() as db:
        job = db.get(Job, job_id)
        if job is None or not job.webhook_url or job.status not in TERMINAL:
            return
        url, payload = job.webhook_url, {"event": "job.finished", "job": repo.job_view(job)}
    result = deliver(url, payload, settings.webhook_secret, settings.webhook_attempts,
                     settings.webhook_backoff_s, settings.webhook_timeout_s)
    with sessions() as db:
        db.execute(update(Job).where(Job.id == job_id).values(webhook_status=result[:200]))
        db.commit()


# --- reaper --------------------------------------------------------------------------------------

def reap_once(settings: Settings, send=None) -> list[str]:  # noqa: ANN001
    """Requeue RUNNING jobs whose heartbeat stopped; FAIL those that used up their attempts."""
    sessions = sessionmaker_for(settings.resolved_database_url)
    cutoff = utcnow() - dt.timedelta(seconds=settings.stale_after_s)
    requeued: list[str] = []
    with sessions() as db:
        stale = db.execute(select(Job.id, Job.attempts, Job.stage).where(
            Job.status == "RUNNING", Job.heartbeat_at < cutoff)).all()
        for job_id, attempts, stage in stale:
            if attempts >= settings.max_attempts:
                res = db.execute(update(Job).where(Job.id == job_id, Job.status == "RUNNING",
                                                   Job.heartbeat_at < cutoff).values(
                    status="FAILED", finished_at=utcnow(), lease=None,
                    error=(f"the worker stopped {attempts} times while running this job (last stage: "
                           f"{stage or 'start'}); it was probably killed for using too much memory. "
                           f"Try a smaller model, fewer windows or a shorter seq_len.")))
                db.commit()
                if res.rowcount == 1:
                    _fire_webhook(job_id, settings)
                continue
            # Back to QUEUED and lease cleared: a dead attempt can no longer write, the next one resumes.
            res = db.execute(update(Job).where(Job.id == job_id, Job.status == "RUNNING",
                                               Job.heartbeat_at < cutoff).values(
                status="QUEUED", lease=None, stage="requeued", message="worker lost; resuming"))
            db.commit()
            if res.rowcount == 1:
                (send or _send)(job_id, settings)
                requeued.append(job_id)
                log.warning("job %s: worker lost after attempt %d, requeued", job_id, attempts)
    return requeued


def _send(job_id: str, settings: Settings) -> None:
    app.send_task("evosparse.run_job", args=[job_id], queue=settings.queue)


_reaper_stop = threading.Event()


def _reaper_loop(settings: Settings) -> None:
    interval = max(0.5, min(settings.stale_after_s / 2, 30.0))
    while not _reaper_stop.wait(interval):
        try:
            reap_once(settings)
        except Exception:
            log.warning("reaper pass failed", exc_info=True)


@setup_logging.connect
def _configure_logging(**_kwargs: object) -> None:
    """Structured (JSON by default) logs instead of Celery's own format; see jobs/log.py."""
    configure_logging()


@worker_init.connect
def _preload(**_kwargs: object) -> None:
    """Import torch/transformers once in the main process, so each forked job process starts warm."""
    try:
        import evosparse.worker.runner  # noqa: F401
        import transformers  # noqa: F401
    except Exception:  # the job itself will report the problem
        log.warning("preloading the runner failed", exc_info=True)


@worker_ready.connect
def _start_reaper(**_kwargs: object) -> None:
    settings = get_settings()
    settings.resolved_work_dir.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=_reaper_loop, args=(settings,), daemon=True, name="evosparse-reaper").start()


@worker_shutting_down.connect
def _stop_reaper(**_kwargs: object) -> None:
    _reaper_stop.set()
