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
4. the transaction that ends the job also writes its webhook outbox row; a task on the webhook
   queue sends it (worker never waits on a receiver).

Which job a message starts is decided in the database (``repo.claim_next``): fair across teams and
within each team's running cap. The sweeper (a thread in every worker) re-sends messages the
broker lost, so a job QUEUED in the database always runs.

If the worker dies (SIGKILL, OOM killer), its heartbeat stops. The reaper thread in every worker's
main process puts such a job back to QUEUED and enqueues it again; the next attempt resumes from
the last checkpointed search state. After ``max_attempts`` deaths the job is FAILED.
"""

from __future__ import annotations

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
from evosparse.jobs import queue, repo
from evosparse.jobs.db import sessionmaker_for
from evosparse.jobs.log import configure_logging, job_context
from evosparse.jobs.models import utcnow
from evosparse.jobs.settings import Settings, get_settings
from evosparse.jobs.spec import JobSpec
from evosparse.jobs.store import Store, collect_orphans, store_from_settings
from evosparse.jobs.validation import SpecRejected, check_spec
from evosparse.pruning.errors import CancelledError, EvosparseError
from evosparse.worker.celery_app import app
from evosparse.worker.hooks import RunHooks
from evosparse.worker.tracking import MlflowTracker, TrackingHooks, TrackingUnavailable

log = logging.getLogger("evosparse.worker")



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


class ServiceHooks(RunHooks):
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


@app.task(name=queue.RUN_JOB, bind=True)
def run_job_task(self, job_id: str) -> str:  # noqa: ANN001
    """Start one job. The message is a token: which job starts is decided fairly in the database."""
    settings = get_settings()
    sessions = sessionmaker_for(settings.resolved_database_url)
    with sessions() as db:
        claim, hint_state = repo.claim_next(db, job_id, _worker_name(self), settings.stale_after_s,
                                            settings.max_attempts, settings.max_running_per_team)
    if hint_state in ("terminal", "missing", "exhausted", "busy"):
        log.info("job %s not run: %s", job_id, hint_state, extra={"job_id": job_id})
        dispatch_webhook(job_id, settings)  # 'exhausted' just wrote the FAILED job's webhook row
    if claim is None:
        return hint_state
    with job_context(claim.job_id):  # every log line of this attempt carries the job id
        if claim.job_id != job_id:
            log.info("message of job %s starts job %s (fair order)", job_id, claim.job_id)
        outcome = execute(claim, settings)
    if outcome != "lost":
        dispatch_webhook(claim.job_id, settings)
    top_up(settings)  # a slot of this team opened: make sure a message is there for its next job
    return outcome


def execute(claim: repo.Claim, settings: Settings) -> str:
    """Run one attempt of a claimed job to a terminal state (or 'lost' if superseded)."""
    from evosparse.worker.runner import run_job  # heavy (torch): imported in the process that runs the job

    sessions = sessionmaker_for(settings.resolved_database_url)
    _lower_priority(settings)
    store = store_from_settings(settings)
    hooks = ServiceHooks(claim, settings, store=store)
    tracker: MlflowTracker | None = None
    beat = Heartbeat(hooks, settings.heartbeat_s)
    beat.start()
    work = settings.resolved_work_dir / f"{claim.job_id}-{claim.attempt}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    old_cwd = os.getcwd()
    status, error, report, objects, prefix = "FAILED", None, None, None, None
    try:
        spec = check_spec(JobSpec.model_validate(claim.spec), settings)  # paths re-checked at run time
        tracker = tracker_for(settings, claim)  # mlflow asked for but missing: the job fails saying so
        os.chdir(work)  # relative paths in a spec must not reach the worker's own folder
        if claim.resume_state is not None:
            log.info("job %s attempt %d resumes after generation %s", claim.job_id, claim.attempt,
                     claim.resume_generation)
        levels = level_store(settings)
        namespace = f"evosparse:score:{claim.job_id}:{claim.attempt}"
        levels.anchor_fanout = anchor_fanout_for(namespace, spec, settings)
        report = run_job(spec, work / "out", TrackingHooks(hooks, tracker) if tracker else hooks,
                         resume_state=resume_state(claim.resume_state, store),
                         levels=levels, scoring=scoring_for(namespace, spec, settings, levels))
        if hooks.lost:
            return "lost"
        if tracker:
            tracker.outputs(work / "out", report)
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
    if tracker:
        tracker.finish(status)
    try:  # a finished job resumes no more: its search states go (the generations stay in the database)
        store.delete_prefix(state_prefix(claim.job_id))
    except Exception:  # noqa: BLE001 - leftover state objects are harmless
        log.warning("could not delete the search states of job %s", claim.job_id, exc_info=True)
    _collect_orphans(settings, claim.job_id, claim.attempt, prefix if status == "SUCCEEDED" else None)
    return status


def tracker_for(settings: Settings, claim: repo.Claim) -> MlflowTracker | None:
    """The job's MLflow run when the service tracks jobs; a tracking server that cannot be reached
    at the start costs the job its tracking (a warning), not its result."""
    if not settings.mlflow_tracking_uri:
        return None
    try:
        return MlflowTracker(settings.mlflow_tracking_uri, settings.mlflow_experiment, claim.spec, claim.job_id)
    except TrackingUnavailable:
        raise
    except Exception:  # noqa: BLE001
        log.warning("MLflow tracking unavailable for job %s; it runs untracked", claim.job_id, exc_info=True)
        return None


def level_store(settings: Settings):  # noqa: ANN201 - worker.leveldb_store.LevelStore (imports torch)
    """Level databases in the object store, with a local copy per machine under the work folder."""
    from evosparse.worker.leveldb_store import LevelStore

    return LevelStore(store_from_settings(settings), settings.resolved_work_dir / "leveldb",
                      scratch_bytes=int(settings.leveldb_scratch_gb * 2**30))


def _score_sender(settings: Settings):  # noqa: ANN202 - (send(context, batch), its broker connection)
    """Wake-ups for the scoring queue over one broker connection (the caller releases it when done)."""
    connection = app.connection_for_write(settings.broker_url)

    def send(context: dict, batch: str) -> None:
        # A wake-up nobody took within the lease's reach is stale: the coordinator did that work alone.
        app.send_task("evosparse.score", args=[context, batch], queue=settings.score_queue,
                      connection=connection, expires=max(60.0, 30 * settings.scoring_lease_s))

    return send, connection


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
        send, connection = _score_sender(settings)
        context = {"namespace": namespace, "spec": spec.model_dump(mode="json"), "leveldb_key": levels.last_key}
        return DistributedFitness(local, redis_from_url(settings.resolved_scoring_redis_url), namespace, context,
                                  spec.search.workers, send, settings.scoring_lease_s, on_close=connection.release,
                                  share_traces=settings.scoring_share_traces)

    return make


def anchor_fanout_for(namespace: str, spec: JobSpec, settings: Settings):  # noqa: ANN201
    """SparseGPT anchors built by the job's scoring workers too (worker/anchor_build.py), or None."""
    if spec.allocation != "evolutionary" or spec.search.workers <= 1 or spec.pruner != "sparsegpt":
        return None
    from evosparse.worker.anchor_build import AnchorFanout
    from evosparse.worker.scoring import redis_from_url

    send, connection = _score_sender(settings)
    return AnchorFanout(redis_from_url(settings.resolved_scoring_redis_url), namespace,
                        {"namespace": namespace, "spec": spec.model_dump(mode="json")}, spec.search.workers, send,
                        settings.scoring_lease_s, on_close=connection.release)


@app.task(name="evosparse.score", acks_late=False, ignore_result=True)
def score_task(context: dict, batch: str) -> int:
    """Wake-up of a scoring worker: score candidates of one selection stage (worker/scoring.py)."""
    from evosparse.worker.scoring import redis_from_url, score_batch

    settings = get_settings()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    with job_context(str(context.get("namespace", "")).removeprefix("evosparse:score:").split(":")[0] or None):
        return score_batch(context, batch, redis_from_url(settings.resolved_scoring_redis_url), level_store(settings),
                           settings.scoring_lease_s)


def _collect_orphans(settings: Settings, job_id: str, attempts: int, keep: str | None) -> None:
    """Remove artifacts that earlier attempts published but never recorded (they died in between)."""
    try:
        removed = collect_orphans(store_from_settings(settings), job_id, attempts, keep)
        if removed:
            log.info("job %s: removed unrecorded artifacts %s", job_id, ", ".join(removed))
    except Exception:  # noqa: BLE001 - garbage left behind is not worth failing a finished job
        log.warning("job %s: could not collect orphaned artifacts", job_id, exc_info=True)


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


# --- webhooks: the outbox row is written with the job's final state; this only sends it -------------

def dispatch_webhook(job_id: str, settings: Settings) -> None:
    """Hand a job's pending webhook to the webhook workers (the sweeper retries if the broker is down)."""
    with sessionmaker_for(settings.resolved_database_url)() as db:
        delivery = repo.pending_delivery_of(db, job_id)
    if delivery is not None:
        try:
            queue.enqueue_webhook(settings, delivery)
        except queue.QueueUnavailable:
            log.warning("webhook of job %s left to the sweeper: broker unavailable", job_id)


@app.task(name=queue.DELIVER_WEBHOOK)
def deliver_webhook_task(delivery_id: str) -> str:
    """One attempt of one delivery, on the webhook queue (never on a pruning worker)."""
    from evosparse.jobs.webhook import encode, send

    settings = get_settings()
    sessions = sessionmaker_for(settings.resolved_database_url)
    with sessions() as db:
        claim = repo.claim_delivery(db, delivery_id, hold_s=settings.webhook_timeout_s * 2 + 30)
    if claim is None:
        return "not due"
    attempt = send(claim.url, encode(claim.payload), claim.secret, claim.id, settings.webhook_timeout_s,
                   settings.webhook_allow_hosts, settings.webhook_allow_networks)
    retry_in = None
    if not attempt.delivered and attempt.retry and claim.attempt < settings.webhook_attempts:
        retry_in = settings.webhook_backoff_s * 2 ** (claim.attempt - 1)
    with sessions() as db:
        status = repo.record_delivery(db, claim, attempt.delivered, retry_in, attempt.detail)
    log.info("webhook delivery %s attempt %d: %s -> %s", claim.id, claim.attempt, attempt.detail, status,
             extra={"job_id": claim.payload.get("job", {}).get("id")})
    if status == "PENDING":
        try:
            queue.enqueue_webhook(settings, claim.id, countdown=retry_in)
        except queue.QueueUnavailable:
            pass  # due rows are re-sent by the sweeper
    return status


# --- sweeper: dead workers, lost messages, due webhooks ----------------------------------------------

def reap_once(settings: Settings, send=None) -> list[str]:  # noqa: ANN001
    """Requeue RUNNING jobs whose heartbeat stopped; FAIL those that used up their attempts."""
    with sessionmaker_for(settings.resolved_database_url)() as db:
        requeued, failed = repo.reap_stale(db, settings.stale_after_s, settings.max_attempts)
    for job_id in failed:
        log.warning("job %s: worker lost too many times, FAILED", job_id)
        dispatch_webhook(job_id, settings)
        _collect_orphans(settings, job_id, settings.max_attempts, None)
    for job_id in requeued:
        log.warning("job %s: worker lost, requeued", job_id)
        try:
            (send or _send)(job_id, settings)
        except queue.QueueUnavailable:
            pass  # QUEUED in the database: sweep_queued sends it once the broker is back
    return requeued


def sweep_queued(settings: Settings) -> list[str]:
    """Re-send messages the broker lost: QUEUED jobs whose message is older than requeue_after_s,
    as many as the queue is short of (jobs merely waiting behind others are not sent twice)."""
    sessions = sessionmaker_for(settings.resolved_database_url)
    with sessions() as db:
        stale = repo.stale_queued(db, settings.requeue_after_s, limit=1000)
        total = repo.queued_total(db) if stale else 0
    if not stale:
        return []
    missing = min(len(stale), total - queue.queue_length(settings))
    sent = []
    for job_id in stale[:max(0, missing)]:
        queue.enqueue(settings, job_id)
        sent.append(job_id)
    with sessions() as db:
        repo.mark_enqueued(db, sent)
    if sent:
        log.warning("re-sent %d job message(s) missing from the broker: %s", len(sent), ", ".join(sent))
    return sent


def top_up(settings: Settings) -> None:
    """After a job ends: if QUEUED jobs outnumber waiting messages, add one (a capped team's next job
    whose message was spent while the team was at its cap)."""
    try:
        with sessionmaker_for(settings.resolved_database_url)() as db:
            total = repo.queued_total(db)
            head = repo.stale_queued(db, 0.0, 1)
        if total and head and queue.queue_length(settings) < total:
            queue.enqueue(settings, head[0])
    except Exception:  # noqa: BLE001 - the sweeper does the same later
        log.warning("top-up after job end failed", exc_info=True)


def sweep_webhooks(settings: Settings) -> int:
    with sessionmaker_for(settings.resolved_database_url)() as db:
        due = repo.due_deliveries(db, settings.requeue_after_s)
    for delivery in due:
        queue.enqueue_webhook(settings, delivery)
    return len(due)


def _send(job_id: str, settings: Settings) -> None:
    queue.enqueue(settings, job_id)


_reaper_stop = threading.Event()
# The sweeper thread lives in the prefork pool's parent, which forks a child for every job. A fork
# taken while the thread is inside SQLite (or a socket library) hands the child a mutex that no
# thread will ever release: the child hangs on its first query. So a fork waits for the current
# pass to end, and no pass starts while a fork is under way.
_sweep_lock = threading.Lock()


def _reset_sweep_lock_in_child() -> None:
    global _sweep_lock
    _sweep_lock = threading.Lock()


os.register_at_fork(before=lambda: _sweep_lock.acquire(), after_in_parent=lambda: _sweep_lock.release(),
                    after_in_child=_reset_sweep_lock_in_child)


def _reaper_loop(settings: Settings) -> None:
    interval = max(0.5, min(settings.stale_after_s / 2, settings.sweep_interval_s, 30.0))
    while not _reaper_stop.wait(interval):
        with _sweep_lock:
            for step in (reap_once, sweep_queued, sweep_webhooks):
                try:
                    step(settings)
                except Exception:  # noqa: BLE001 - the next pass retries (broker or database blip)
                    log.warning("sweeper step %s failed", step.__name__, exc_info=True)


@setup_logging.connect
def _configure_logging(**_kwargs: object) -> None:
    """Structured (JSON by default) logs instead of Celery's own format; see jobs/log.py."""
    configure_logging()


@worker_init.connect
def _preload(sender=None, **_kwargs: object) -> None:  # noqa: ANN001
    """Import torch/transformers once in the main process, so each forked job process starts warm
    (not in a webhook-only worker, which never runs a job)."""
    consumed = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    names = set(getattr(consumed, "consume_from", None) or {})
    if names and names == {get_settings().resolved_webhook_queue}:
        return
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
