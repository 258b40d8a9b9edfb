"""The job record on a real database: runs on SQLite and on PostgreSQL (the `db_url` fixture)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from evosparse.jobs import repo
from evosparse.jobs.db import migrate, session_scope, sessionmaker_for
from evosparse.jobs.models import ApiKey, Generation, Job, utcnow
from evosparse.jobs.settings import Settings
from sqlalchemy import select, update

SPEC = {"model": "smollm2-135m", "sparsity": 0.5, "allocation": "evolutionary", "search": {"generations": 5}}


def _team(db) -> int:  # noqa: ANN001
    return repo.get_or_create_team(db, f"team-{uuid.uuid4().hex[:8]}").id


def test_migrate_twice_is_a_no_op(db_url):
    migrate(db_url)
    migrate(db_url)
    with session_scope(db_url) as db:
        assert db.execute(select(Job)).first() is None or True  # the table exists and answers


def test_api_key_is_stored_hashed_and_resolves_to_its_team(db_url):
    with session_scope(db_url) as db:
        token, key = repo.create_api_key(db, f"t-{uuid.uuid4().hex[:6]}")
        team_id = key.team_id
    with session_scope(db_url) as db:
        stored = db.scalar(select(ApiKey).where(ApiKey.team_id == team_id))
        assert token not in (stored.key_hash, stored.prefix) and stored.key_hash == repo.hash_token(token)
        assert repo.team_for_token(db, token) == team_id
        assert repo.team_for_token(db, token + "x") is None
        db.execute(update(ApiKey).where(ApiKey.id == stored.id).values(revoked_at=utcnow()))
        db.commit()
        assert repo.team_for_token(db, token) is None


def test_idempotency_key_is_unique_per_team(db_url):
    with sessionmaker_for(db_url)() as db:
        a, b = _team(db), _team(db)
        db.commit()
        j1, created1 = repo.create_job(db, a, SPEC, "release-42")
        j2, created2 = repo.create_job(db, a, SPEC, "release-42")
        j3, created3 = repo.create_job(db, b, SPEC, "release-42")
        assert created1 and not created2 and created3
        assert j1.id == j2.id != j3.id
        assert j1.generations_total == 5
        with pytest.raises(repo.IdempotencyConflict):
            repo.create_job(db, a, {**SPEC, "sparsity": 0.6}, "release-42")


def test_claim_is_exclusive_and_finished_jobs_are_left_alone(db_url):
    with sessionmaker_for(db_url)() as db:
        team = _team(db)
        job, _ = repo.create_job(db, team, SPEC)
        claim = repo.claim_job(db, job.id, "w1", stale_after_s=60, max_attempts=3)
        assert isinstance(claim, repo.Claim) and claim.attempt == 1 and claim.resume_state is None
        assert repo.claim_job(db, job.id, "w2", stale_after_s=60, max_attempts=3) == "busy"
        assert repo.finish_job(db, claim, "SUCCEEDED", report={"ok": 1})
        assert repo.claim_job(db, job.id, "w2", stale_after_s=60, max_attempts=3) == "terminal"
        assert repo.claim_job(db, "no-such-job", "w2", stale_after_s=60, max_attempts=3) == "missing"
        db.refresh(job)
        assert (job.status, job.progress, job.attempts, job.report) == ("SUCCEEDED", 1.0, 1, {"ok": 1})


def test_stale_job_is_taken_over_with_its_state_and_the_old_attempt_is_fenced(db_url):
    with sessionmaker_for(db_url)() as db:
        team = _team(db)
        job, _ = repo.create_job(db, team, SPEC)
        old = repo.claim_job(db, job.id, "w1", stale_after_s=60, max_attempts=3)
        for g in range(3):
            assert repo.record_generation(db, old, {"generation": g, "best": 1.0 / (g + 1), "mean": 2.0,
                                                    "tokens": 64, "seconds": 0.1, "best_vector": [0.5, 0.5]},
                                          f"state-{g}".encode())
        db.execute(update(Job).where(Job.id == job.id).values(
            heartbeat_at=utcnow() - dt.timedelta(seconds=120)))
        db.commit()
        new = repo.claim_job(db, job.id, "w2", stale_after_s=60, max_attempts=3)
        assert isinstance(new, repo.Claim)
        assert (new.attempt, new.resume_state, new.resume_generation) == (2, b"state-2", 2)
        # The superseded attempt can no longer write anything.
        assert not repo.leased_update(db, old, progress=0.9)
        assert not repo.record_generation(db, old, {"generation": 3, "best": 0.1}, b"x")
        assert not repo.finish_job(db, old, "FAILED", error="zombie")
        assert repo.is_cancel_requested(db, old) is None
        assert repo.record_generation(db, new, {"generation": 3, "best": 0.2}, b"state-3")
        gens = repo.generations_of(db, job.id)
        assert [g.generation for g in gens] == [0, 1, 2, 3]
        assert [g.attempt for g in gens] == [1, 1, 1, 2]


def test_a_generation_recorded_twice_keeps_one_row(db_url):
    with sessionmaker_for(db_url)() as db:
        job, _ = repo.create_job(db, _team(db), SPEC)
        claim = repo.claim_job(db, job.id, "w1", stale_after_s=60, max_attempts=3)
        repo.record_generation(db, claim, {"generation": 0, "best": 3.0}, b"a")
        repo.record_generation(db, claim, {"generation": 0, "best": 2.0, "best_vector": [0.1]}, b"b")
        rows = db.scalars(select(Generation).where(Generation.job_id == job.id)).all()
        assert len(rows) == 1 and rows[0].best == 2.0
        db.refresh(job)
        assert job.search_state == b"b" and job.best_fitness == 2.0


def test_cancel_of_queued_job_is_immediate_and_of_running_job_is_a_flag(db_url):
    with sessionmaker_for(db_url)() as db:
        team = _team(db)
        queued, _ = repo.create_job(db, team, SPEC)
        assert repo.request_cancel(db, queued).status == "CANCELLED"
        running, _ = repo.create_job(db, team, SPEC)
        claim = repo.claim_job(db, running.id, "w1", stale_after_s=60, max_attempts=3)
        assert repo.is_cancel_requested(db, claim) is False
        job = repo.request_cancel(db, running)
        assert job.status == "RUNNING" and job.cancel_requested
        assert repo.is_cancel_requested(db, claim) is True


def test_reaper_requeues_dead_workers_jobs_and_fails_after_max_attempts(db_url):
    from evosparse.worker.tasks import reap_once

    settings = Settings(database_url=db_url, stale_after_s=30, max_attempts=2)
    sent: list[str] = []
    with sessionmaker_for(db_url)() as db:
        team = _team(db)
        job, _ = repo.create_job(db, team, SPEC)
        repo.claim_job(db, job.id, "w1", stale_after_s=30, max_attempts=2)
        reap_once(settings, send=lambda jid, _s: sent.append(jid))
        assert job.id not in sent  # heartbeat fresh: left alone
        old = utcnow() - dt.timedelta(seconds=60)
        db.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=old))
        db.commit()
        reap_once(settings, send=lambda jid, _s: sent.append(jid))
        db.refresh(job)
        assert job.id in sent and job.status == "QUEUED" and job.lease is None
        repo.claim_job(db, job.id, "w2", stale_after_s=30, max_attempts=2)  # attempt 2 ...
        db.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=old))  # ... dies too
        db.commit()
        reap_once(settings, send=lambda jid, _s: sent.append(jid))
        db.refresh(job)
        assert job.status == "FAILED" and "stopped 2 times" in job.error
        assert sent.count(job.id) == 1


def test_list_is_paginated_filtered_and_team_scoped(db_url):
    with sessionmaker_for(db_url)() as db:
        a, b = _team(db), _team(db)
        ids = [repo.create_job(db, a, SPEC)[0].id for _ in range(5)]
        repo.create_job(db, b, SPEC)
        repo.request_cancel(db, repo.get_job(db, a, ids[0]))
        page, total = repo.list_jobs(db, a, None, limit=2, offset=0)
        assert total == 5 and len(page) == 2
        rest, _ = repo.list_jobs(db, a, None, limit=10, offset=2)
        assert {j.id for j in page} | {j.id for j in rest} == set(ids)
        cancelled, n = repo.list_jobs(db, a, "CANCELLED", limit=10, offset=0)
        assert n == 1 and cancelled[0].id == ids[0]
        assert repo.get_job(db, b, ids[1]) is None
