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

from evosparse.jobs.models import TERMINAL, ApiKey, Artifact, Generation, Job, Team, utcnow
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

TOKEN_PREFIX = "evs_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- teams and keys ----------------------------------------------------------------------------

def get_or_create_team(session: Session, name: str) -> Team:
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("team name must be 1-100 characters")
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        team = Team(name=name)
        session.add(team)
        session.flush()
    return team


def create_api_key(session: Session, team_name: str) -> tuple[str, ApiKey]:
    """Create a key for ``team_name`` (team created if new). The token is returned once, never stored."""
    team = get_or_create_team(session, team_name)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(team_id=team.id, key_hash=hash_token(token), prefix=token[:12])
    session.add(key)
    session.flush()
    return token, key


def team_for_token(session: Session, token: str) -> int | None:
    row = session.execute(
        select(ApiKey.team_id).where(ApiKey.key_hash == hash_token(token), ApiKey.revoked_at.is_(None))
    ).first()
    return None if row is None else int(row[0])


# --- jobs (user side) ----------------------------------------------------------------------------

def create_job(session: Session, team_id: int, spec: dict, idempotency_key: str | None = None,
               webhook_url: str | None = None) -> tuple[Job, bool]:
    """Insert a QUEUED job; with an idempotency key an existing job of the same team is returned.

    Returns (job, created). Raises ``IdempotencyConflict`` if the key was used with another spec.
    """
    if idempotency_key:
        existing = _by_idempotency(session, team_id, idempotency_key)
        if existing is not None:
            return _same_or_conflict(existing, spec), False
    generations_total = spec["search"]["generations"] if spec.get("allocation") == "evolutionary" else None
    job = Job(team_id=team_id, spec=spec, idempotency_key=idempotency_key, webhook_url=webhook_url,
              status="QUEUED", generations_total=generations_total)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Two requests with the same key raced: the other one won, return its job.
        session.rollback()
        existing = _by_idempotency(session, team_id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_or_conflict(existing, spec), False
    return job, True


class IdempotencyConflict(ValueError):
    pass


def _by_idempotency(session: Session, team_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.team_id == team_id, Job.idempotency_key == key))


def _same_or_conflict(job: Job, spec: dict) -> Job:
    if job.spec != spec:
        raise IdempotencyConflict("this Idempotency-Key was already used for a job with a different spec")
    return job


def get_job(session: Session, team_id: int, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team_id))


def list_jobs(session: Session, team_id: int, status: str | None, limit: int, offset: int
              ) -> tuple[list[Job], int]:
    q = select(Job).where(Job.team_id == team_id)
    c = select(func.count()).select_from(Job).where(Job.team_id == team_id)
    if status:
        q, c = q.where(Job.status == status), c.where(Job.status == status)
    total = session.scalar(c) or 0
    rows = session.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
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
    session.execute(update(Job).where(Job.id == job.id, Job.status == "QUEUED")
                    .values(status="CANCELLED", finished_at=now, cancel_requested=True,
                            error="cancelled before it started"))
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
    return {
        "id": job.id,
        "status": job.status,
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
    return {"generation": g.generation, "best": g.best, "mean": g.mean, "tokens": g.tokens,
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
    session.execute(update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL))
                    .values(status=status, error=error, finished_at=utcnow(), lease=None))
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
    session.commit()
    return True


def is_cancel_requested(session: Session, claim: Claim) -> bool | None:
    """True/False, or None when this attempt no longer holds the job."""
    row = session.execute(select(Job.cancel_requested, Job.lease, Job.status).where(Job.id == claim.job_id)).first()
    if row is None or row[1] != claim.lease or row[2] != "RUNNING":
        return None
    return bool(row[0])
