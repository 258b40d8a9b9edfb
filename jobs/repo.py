"""Database operations on the job record, shared by the API, the worker and the CLI.

Every query that serves a user is filtered by team, so another team's job is simply not found.
Worker writes carry the attempt's lease token: a superseded attempt (a worker presumed dead that
was in fact alive) can no longer change the job.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from dataclasses import dataclass

from evosparse.jobs.listing import DEFAULT_SORT, SORT_KEYS
from evosparse.jobs.models import TERMINAL, ApiKey, Artifact, Generation, Job, Team, WebhookDelivery, utcnow
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

TOKEN_PREFIX = "evs_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- teams and keys ----------------------------------------------------------------------------

def get_or_create_team(session: Session, name: str) -> Team:
    """The team called ``name``; a new team gets its webhook signing secret at once."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("team name must be 1-100 characters")
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        team = Team(name=name, webhook_secret=new_webhook_secret())
        session.add(team)
        session.flush()
    return team


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def rotate_webhook_secret(session: Session, team_name: str) -> str:
    """Give the team a new webhook secret (returned once); deliveries sent from now on use it."""
    team = session.scalar(select(Team).where(Team.name == team_name.strip()))
    if team is None:
        raise LookupError(f"no team named {team_name!r}")
    team.webhook_secret = new_webhook_secret()
    session.flush()
    return team.webhook_secret


def create_api_key(session: Session, team_name: str, expires_at: dt.datetime | None = None,
                   name: str | None = None) -> tuple[str, ApiKey]:
    """Create a key for ``team_name`` (team created if new). The token is returned once, never stored."""
    team = get_or_create_team(session, team_name)
    if expires_at is not None and expires_at <= utcnow():
        raise ValueError("the expiry must be in the future")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(team_id=team.id, key_hash=hash_token(token), prefix=token[:12], expires_at=expires_at,
                 name=(name or "")[:100] or None)
    session.add(key)
    session.flush()
    return token, key


def team_for_token(session: Session, token: str, touch_every_s: float = 60.0) -> int | None:
    """The team of a live key (not revoked, not expired), or None. Read on every request, so a
    revocation or expiry applies at once in every API process. ``last_used_at`` is written at most
    once per ``touch_every_s`` per key (a write per request would contend with the workers)."""
    now = utcnow()
    row = session.execute(
        select(ApiKey.id, ApiKey.team_id, ApiKey.expires_at, ApiKey.last_used_at)
        .where(ApiKey.key_hash == hash_token(token), ApiKey.revoked_at.is_(None))
    ).first()
    if row is None or (row.expires_at is not None and row.expires_at <= now):
        return None
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() >= touch_every_s:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()
    return int(row.team_id)


@dataclass
class KeyInfo:
    id: int
    team: str
    prefix: str
    name: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= utcnow():
            return "expired"
        return "active"


def list_keys(session: Session, team_name: str | None = None) -> list[KeyInfo]:
    q = select(ApiKey, Team.name).join(Team, Team.id == ApiKey.team_id).order_by(Team.name, ApiKey.id)
    if team_name:
        q = q.where(Team.name == team_name)
    return [KeyInfo(k.id, t, k.prefix, k.name, k.created_at, k.expires_at, k.last_used_at, k.revoked_at)
            for k, t in session.execute(q)]


def find_key(session: Session, ref: str) -> ApiKey:
    """A key by numeric id or by its shown prefix (``evs_AbCd…``); LookupError if none or ambiguous."""
    ref = ref.strip()
    if ref.isdigit():
        key = session.get(ApiKey, int(ref))
        if key is None:
            raise LookupError(f"no API key with id {ref}")
        return key
    if len(ref) < 8:
        raise LookupError("give the key's id or at least 8 characters of its prefix")
    found = list(session.scalars(select(ApiKey).where(ApiKey.prefix.startswith(ref[:12], autoescape=True))))
    if len(found) != 1:
        raise LookupError(f"{len(found)} keys match {ref!r}; use the id shown by `evosparse keys list`")
    return found[0]


def revoke_key(session: Session, ref: str) -> ApiKey:
    key = find_key(session, ref)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def rotate_key(session: Session, ref: str, expires_at: dt.datetime | None = None) -> tuple[str, ApiKey, ApiKey]:
    """Revoke a key and create its replacement for the same team in one transaction."""
    old = find_key(session, ref)
    if old.revoked_at is not None:
        raise LookupError(f"key {old.id} is already revoked")
    team = session.get(Team, old.team_id)
    token, new = create_api_key(session, team.name, expires_at=expires_at, name=old.name)
    old.revoked_at = utcnow()
    session.flush()
    return token, new, old


# --- jobs (user side) ----------------------------------------------------------------------------

def create_job(session: Session, team_id: int, spec: dict, idempotency_key: str | None = None,
               webhook_url: str | None = None) -> tuple[Job, bool]:
    """Insert a QUEUED job; with an idempotency key an existing job of the same team is returned.

    Returns (job, created). Raises ``IdempotencyConflict`` if the key was used with another spec.
    """
    if idempotency_key:
        existing = get_by_idempotency(session, team_id, idempotency_key)
        if existing is not None:
            return _same_or_conflict(existing, spec, webhook_url), False
    generations_total = spec["search"]["generations"] if spec.get("allocation") == "evolutionary" else None
    job = Job(team_id=team_id, spec=spec, idempotency_key=idempotency_key, webhook_url=webhook_url,
              status="QUEUED", generations_total=generations_total, enqueued_at=utcnow(),
              name=spec.get("name"), labels=spec.get("labels") or {})
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Two requests with the same key raced: the other one won, return its job.
        session.rollback()
        existing = get_by_idempotency(session, team_id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_or_conflict(existing, spec, webhook_url), False
    return job, True


class IdempotencyConflict(ValueError):
    pass


def get_by_idempotency(session: Session, team_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.team_id == team_id, Job.idempotency_key == key))


def _same_or_conflict(job: Job, spec: dict, webhook_url: str | None) -> Job:
    if job.spec != spec:
        raise IdempotencyConflict("this Idempotency-Key was already used for a job with a different spec")
    if job.webhook_url != webhook_url:
        raise IdempotencyConflict("this Idempotency-Key was already used for a job with a different webhook_url")
    return job


def queued_count(session: Session, team_id: int) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(
        Job.team_id == team_id, Job.status == "QUEUED")) or 0)


def get_job(session: Session, team_id: int, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team_id))


# The columns jobs.listing names as sortable; ties break by id.
SORTABLE = {key: getattr(Job, key) for key in SORT_KEYS}


@dataclass(frozen=True)
class JobFilter:
    """What GET /v1/jobs narrows the team's jobs to, besides the status. ``labels`` maps a key to a value, or to None
    for "has this label"; ``search`` matches the id's start, or a part of the name or model."""

    name: str | None = None
    labels: tuple[tuple[str, str | None], ...] = ()
    search: str | None = None


def list_jobs(session: Session, team_id: int, status: str | None, limit: int, offset: int,
              where: JobFilter | None = None, sort: str = DEFAULT_SORT) -> tuple[list[Job], int]:
    where = where or JobFilter()
    conditions = [Job.team_id == team_id]
    if status:
        conditions.append(Job.status == status)
    if where.name is not None:
        conditions.append(Job.name == where.name)
    for key, value in where.labels:
        field = Job.labels[key].as_string()
        conditions.append(field.is_not(None) if value is None else field == value)
    if where.search:
        needle = where.search.lower()
        conditions.append(Job.id.startswith(needle, autoescape=True)
                          | func.lower(Job.name).contains(needle, autoescape=True)
                          | func.lower(Job.spec["model"].as_string()).contains(needle, autoescape=True))
    descending = sort.startswith("-")
    column = SORTABLE[sort.lstrip("-")]
    order = [column.desc() if descending else column.asc(), Job.id]
    total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    rows = session.scalars(select(Job).where(*conditions).order_by(*order).limit(limit).offset(offset)).all()
    return list(rows), int(total)


def generations_of(session: Session, job_id: str) -> list[Generation]:
    return list(session.scalars(select(Generation).where(Generation.job_id == job_id)
                                .order_by(Generation.generation)).all())


def artifacts_of(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)).all())


def request_cancel(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one gets the flag its runner polls."""
    if job.status in TERMINAL:
        return job
    now = utcnow()
    res = session.execute(update(Job).where(Job.id == job.id, Job.status == "QUEUED")
                          .values(status="CANCELLED", finished_at=now, cancel_requested=True,
                                  error="cancelled before it started", lease=None))
    if res.rowcount == 1:
        _write_outbox(session, job.id)
    session.execute(update(Job).where(Job.id == job.id, Job.status == "RUNNING").values(cancel_requested=True))
    session.commit()
    session.refresh(job)
    return job


def delete_job(session: Session, job_id: str) -> None:
    """Used when the broker refused the job right after insertion (no half-created job remains)."""
    session.execute(Job.__table__.delete().where(Job.id == job_id))
    session.commit()


# --- REST views ------------------------------------------------------------------------------

def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def eta_seconds(job: Job, now: dt.datetime | None = None) -> float | None:
    """Time left, extrapolated from the progress made since the job (last) started."""
    if job.status != "RUNNING" or job.started_at is None or not job.progress or job.progress < 0.01:
        return None
    elapsed = ((now or utcnow()) - job.started_at).total_seconds()
    return max(0.0, round(elapsed * (1.0 - job.progress) / job.progress, 1))


def job_view(job: Job) -> dict:
    """The REST shape of a job. ``webhook_status`` is generic on purpose (pending / delivered /
    failed): the receiver's answers and network errors stay in the operator's logs, so the field
    cannot be used to probe what sits behind a URL."""
    return {
        "id": job.id,
        "status": job.status,
        "name": job.name,
        "labels": job.labels or {},
        "spec": job.spec,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "progress": round(float(job.progress or 0.0), 4),
        "stage": job.stage,
        "message": job.message,
        "generation": job.generation,
        "generations_total": job.generations_total,
        "best_fitness": job.best_fitness,
        "eta_seconds": eta_seconds(job),
        "error": job.error,
        "attempts": job.attempts,
        "worker": job.worker,
        "cancel_requested": bool(job.cancel_requested),
        "webhook_status": job.webhook_status,
        "report": job.report,
    }


def generation_view(g: Generation) -> dict:
    return {"generation": g.generation, "best": g.best, "mean": g.mean, "val": g.val, "tokens": g.tokens,
            "seconds": g.seconds, "best_vector": g.best_vector, "attempt": g.attempt}


# --- jobs (worker side) ------------------------------------------------------------------------

@dataclass
class Claim:
    job_id: str
    lease: str
    attempt: int
    spec: dict
    resume_state: bytes | None
    resume_generation: int | None


def claim_job(session: Session, job_id: str, worker: str, stale_after_s: float, max_attempts: int
              ) -> Claim | str:
    """Atomically take a job for this attempt.

    Returns a Claim, or a reason string: 'missing', 'terminal', 'busy' (another live attempt holds
    it; retry later), 'exhausted' (marked FAILED after too many dead workers).
    """
    now = utcnow()
    job = session.get(Job, job_id)
    if job is None:
        return "missing"
    if job.status in TERMINAL:
        return "terminal"
    if job.status == "QUEUED" and job.cancel_requested:
        _finish_unleased(session, job_id, "CANCELLED", "cancelled before it started")
        return "terminal"
    if job.status == "RUNNING" and job.attempts >= max_attempts:
        stale = job.heartbeat_at is None or (now - job.heartbeat_at).total_seconds() > stale_after_s
        if stale:
            _finish_unleased(session, job_id, "FAILED", (
                f"the worker stopped {job.attempts} times while running this job (last stage: "
                f"{job.stage or 'start'}); it was probably killed for using too much memory. "
                f"Try a smaller model, fewer windows or a shorter seq_len."))
            return "exhausted"
    lease = uuid.uuid4().hex
    stale_before = now - dt.timedelta(seconds=stale_after_s)
    res = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .where((Job.status == "QUEUED") | ((Job.status == "RUNNING") & (Job.heartbeat_at < stale_before)))
        .values(status="RUNNING", attempts=Job.attempts + 1, worker=worker, lease=lease, heartbeat_at=now,
                started_at=func.coalesce(Job.started_at, now), error=None)
    )
    session.commit()
    if res.rowcount != 1:
        session.refresh(job)
        return "terminal" if job.status in TERMINAL else "busy"
    session.refresh(job)
    return Claim(job_id, lease, job.attempts, dict(job.spec), job.search_state, job.search_state_generation)


def _finish_unleased(session: Session, job_id: str, status: str, error: str | None) -> None:
    res = session.execute(update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL))
                          .values(status=status, error=error, finished_at=utcnow(), lease=None))
    if res.rowcount == 1:
        _write_outbox(session, job_id)
    session.commit()


def leased_update(session: Session, claim: Claim, **values: object) -> bool:
    """Update the job only if this attempt still holds it; False means the lease was lost."""
    res = session.execute(update(Job).where(Job.id == claim.job_id, Job.lease == claim.lease,
                                            Job.status == "RUNNING").values(**values))
    session.commit()
    return res.rowcount == 1


def record_generation(session: Session, claim: Claim, record: dict, state: bytes) -> bool:
    """Store one generation row and the search state after it, in one transaction."""
    gen = int(record["generation"])
    held = session.execute(
        update(Job).where(Job.id == claim.job_id, Job.lease == claim.lease, Job.status == "RUNNING")
        .values(generation=gen, best_fitness=_finite(record.get("best")), search_state=state,
                search_state_generation=gen, heartbeat_at=utcnow())
    ).rowcount == 1
    if not held:
        session.rollback()
        return False
    existing = session.scalar(select(Generation).where(Generation.job_id == claim.job_id,
                                                       Generation.generation == gen))
    row = existing or Generation(job_id=claim.job_id, generation=gen)
    row.best, row.mean = _finite(record.get("best")), _finite(record.get("mean"))
    row.val = _finite(record.get("val"))
    row.tokens = int(record["tokens"]) if record.get("tokens") is not None else None
    row.seconds = _finite(record.get("seconds"))
    row.best_vector = [float(x) for x in record.get("best_vector") or []]
    row.attempt = claim.attempt
    session.add(row)
    session.commit()
    return True


def _finite(x: object) -> float | None:
    import math

    if x is None:
        return None
    x = float(x)  # type: ignore[arg-type]
    return x if math.isfinite(x) else None


def finish_job(session: Session, claim: Claim, status: str, error: str | None = None, report: dict | None = None,
               artifacts: list | None = None, artifact_prefix: str | None = None) -> bool:
    """Terminal transition with its artifacts, in one transaction; False if the lease was lost."""
    values: dict = {"status": status, "error": error, "finished_at": utcnow(), "lease": None,
                    "heartbeat_at": utcnow()}
    if status == "SUCCEEDED":
        values.update(progress=1.0, stage="done", report=report, artifact_prefix=artifact_prefix)
    res = session.execute(update(Job).where(Job.id == claim.job_id, Job.lease == claim.lease,
                                            Job.status == "RUNNING").values(**values))
    if res.rowcount != 1:
        session.rollback()
        return False
    for obj in artifacts or []:
        session.add(Artifact(job_id=claim.job_id, name=obj.name, uri=obj.uri, size=obj.size, sha256=obj.sha256))
    session.flush()
    _write_outbox(session, claim.job_id)  # same transaction: a finished job always has its webhook row
    session.commit()
    return True


def is_cancel_requested(session: Session, claim: Claim) -> bool | None:
    """True/False, or None when this attempt no longer holds the job."""
    row = session.execute(select(Job.cancel_requested, Job.lease, Job.status).where(Job.id == claim.job_id)).first()
    if row is None or row[1] != claim.lease or row[2] != "RUNNING":
        return None
    return bool(row[0])


def _dead_worker_error(attempts: int, stage: str | None) -> str:
    return (f"the worker stopped {attempts} times while running this job (last stage: {stage or 'start'}); "
            f"it was probably killed for using too much memory. Try a smaller model, fewer windows or a "
            f"shorter seq_len.")


# --- scheduling: fair claim, dead workers, lost messages ------------------------------------------

def pick_fair(session: Session, max_running_per_team: int) -> str | None:
    """The QUEUED job to start next, round-robin over teams: the team with the fewest RUNNING jobs
    (below its cap) goes first; among equals, the team that last started a job longest ago (or
    never); then its oldest job. One team's backlog never stands in front of another's first job."""
    heads = dict(session.execute(select(Job.team_id, func.min(Job.created_at)).where(Job.status == "QUEUED")
                                 .group_by(Job.team_id)).all())
    if not heads:
        return None
    teams = list(heads)
    running = dict(session.execute(select(Job.team_id, func.count()).where(
        Job.status == "RUNNING", Job.team_id.in_(teams)).group_by(Job.team_id)).all())
    last_start = dict(session.execute(select(Job.team_id, func.max(Job.started_at)).where(
        Job.team_id.in_(teams), Job.started_at.is_not(None)).group_by(Job.team_id)).all())
    never = dt.datetime.min.replace(tzinfo=dt.UTC)
    eligible = [(running.get(t, 0), _aware(last_start.get(t)) or never, _aware(heads[t]), t) for t in teams
                if not max_running_per_team or running.get(t, 0) < max_running_per_team]
    if not eligible:
        return None
    team = min(eligible)[3]
    return session.scalar(select(Job.id).where(Job.team_id == team, Job.status == "QUEUED")
                          .order_by(Job.created_at, Job.id).limit(1))


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    # Aggregates bypass the column type, so SQLite hands back naive (UTC) datetimes, or even strings.
    if isinstance(t, str):
        t = dt.datetime.fromisoformat(t)
    if t is not None and t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t


def claim_next(session: Session, hint: str, worker: str, stale_after_s: float, max_attempts: int,
               max_running_per_team: int) -> tuple[Claim | None, str]:
    """Claim the job a message should run. Returns (claim or None, what happened to ``hint``).

    A broker message is a token for "one job may start", not a promise about which one: the job
    is chosen fairly in the database (``pick_fair``). The message's own job is taken directly only
    when it is RUNNING under a dead worker (resume it now) -- that is the redelivery after a crash.
    """
    job = session.get(Job, hint)
    if job is not None and job.status == "RUNNING":
        got = claim_job(session, hint, worker, stale_after_s, max_attempts)
        if isinstance(got, Claim):
            return got, "resumed"
        hint_state = got
    else:
        hint_state = "missing" if job is None else ("terminal" if job.status in TERMINAL else "queued")
    for _ in range(8):  # a pick can lose a race with another worker; try the next one
        pick = pick_fair(session, max_running_per_team)
        if pick is None:
            return None, hint_state
        got = claim_job(session, pick, worker, stale_after_s, max_attempts)
        if isinstance(got, Claim):
            return got, hint_state
        session.expire_all()
    return None, hint_state


def reap_stale(session: Session, stale_after_s: float, max_attempts: int) -> tuple[list[str], list[str]]:
    """RUNNING jobs whose heartbeat stopped: back to QUEUED (resumable), or FAILED after
    ``max_attempts`` dead workers. Returns (requeued ids, failed ids)."""
    cutoff = utcnow() - dt.timedelta(seconds=stale_after_s)
    requeued: list[str] = []
    failed: list[str] = []
    stale = session.execute(select(Job.id, Job.attempts, Job.stage).where(
        Job.status == "RUNNING", Job.heartbeat_at < cutoff)).all()
    for job_id, attempts, stage in stale:
        where = (Job.id == job_id, Job.status == "RUNNING", Job.heartbeat_at < cutoff)
        if attempts >= max_attempts:
            res = session.execute(update(Job).where(*where).values(
                status="FAILED", finished_at=utcnow(), lease=None, error=_dead_worker_error(attempts, stage)))
            if res.rowcount == 1:
                _write_outbox(session, job_id)
                failed.append(job_id)
            session.commit()
            continue
        # Back to QUEUED and lease cleared: a dead attempt can no longer write, the next one resumes.
        res = session.execute(update(Job).where(*where).values(
            status="QUEUED", lease=None, stage="requeued", message="worker lost; resuming", enqueued_at=utcnow()))
        session.commit()
        if res.rowcount == 1:
            requeued.append(job_id)
    return requeued, failed


def queued_total(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.status == "QUEUED")) or 0)


def stale_queued(session: Session, older_than_s: float, limit: int) -> list[str]:
    """QUEUED jobs whose last broker message was sent more than ``older_than_s`` ago, oldest first."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    sent = func.coalesce(Job.enqueued_at, Job.created_at)  # rows from before 0002 have no enqueued_at
    return list(session.scalars(select(Job.id).where(Job.status == "QUEUED", sent < cutoff)
                                .order_by(sent).limit(max(0, limit))))


def mark_enqueued(session: Session, job_ids: list[str]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == "QUEUED").values(enqueued_at=utcnow()))
        session.commit()


# --- webhook outbox ---------------------------------------------------------------------------------

def _write_outbox(session: Session, job_id: str) -> str | None:
    """Queue the completion webhook of a job that just became terminal (caller commits)."""
    session.flush()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or not job.webhook_url or job.status not in TERMINAL:
        return None
    if session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.job_id == job_id)) is not None:
        return None  # one completion event per job
    delivery = WebhookDelivery(job_id=job_id, team_id=job.team_id, url=job.webhook_url, payload={},
                               status="PENDING", attempts=0, next_attempt_at=utcnow())
    session.add(delivery)
    session.flush()
    job.webhook_status = "pending"
    session.flush()
    delivery.payload = {"event": "job.finished", "delivery_id": delivery.id, "team_id": job.team_id,
                        "job": job_view(job)}
    session.flush()
    return delivery.id


def pending_delivery_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.job_id == job_id,
                                                            WebhookDelivery.status == "PENDING"))


@dataclass
class DeliveryClaim:
    id: str
    url: str
    payload: dict
    secret: str
    attempt: int


def claim_delivery(session: Session, delivery_id: str, hold_s: float) -> DeliveryClaim | None:
    """Take a due PENDING delivery for ``hold_s`` seconds (None if delivered, not due or held)."""
    now = utcnow()
    res = session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.status == "PENDING",
        WebhookDelivery.next_attempt_at <= now,
        (WebhookDelivery.claimed_until.is_(None)) | (WebhookDelivery.claimed_until < now),
    ).values(claimed_until=now + dt.timedelta(seconds=hold_s), attempts=WebhookDelivery.attempts + 1))
    session.commit()
    if res.rowcount != 1:
        return None
    d = session.get(WebhookDelivery, delivery_id, populate_existing=True)
    team = session.get(Team, d.team_id)
    if team.webhook_secret is None:  # a team from before per-team secrets: give it one now
        team.webhook_secret = new_webhook_secret()
        session.commit()
    return DeliveryClaim(d.id, d.url, dict(d.payload), team.webhook_secret, d.attempts)


def record_delivery(session: Session, claim: DeliveryClaim, delivered: bool, retry_in_s: float | None,
                    detail: str) -> str:
    """Store an attempt's outcome; returns the row's new status (PENDING means retry later)."""
    now = utcnow()
    if delivered:
        status, values = "DELIVERED", {"delivered_at": now}
    elif retry_in_s is not None:
        status, values = "PENDING", {"next_attempt_at": now + dt.timedelta(seconds=retry_in_s)}
    else:
        status, values = "FAILED", {}
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == claim.id).values(
        status=status, claimed_until=None, last_error=None if delivered else detail[:500], **values))
    job_id = session.scalar(select(WebhookDelivery.job_id).where(WebhookDelivery.id == claim.id))
    generic = {"DELIVERED": "delivered", "PENDING": "retrying", "FAILED": "failed"}[status]
    session.execute(update(Job).where(Job.id == job_id).values(webhook_status=generic))
    session.commit()
    return status


def due_deliveries(session: Session, unsent_for_s: float, limit: int = 100) -> list[str]:
    """PENDING deliveries due for ``unsent_for_s`` seconds and held by no sender: their message was
    lost or their sender died. Their due time is moved to now, so each is re-sent once per period."""
    now = utcnow()
    ids = list(session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.status == "PENDING",
        WebhookDelivery.next_attempt_at <= now - dt.timedelta(seconds=unsent_for_s),
        (WebhookDelivery.claimed_until.is_(None)) | (WebhookDelivery.claimed_until < now),
    ).order_by(WebhookDelivery.next_attempt_at).limit(limit)))
    if ids:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(next_attempt_at=now))
        session.commit()
    return ids
