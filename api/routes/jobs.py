"""/v1/jobs: submit, list, get, generation history, cancel, artifacts. Every lookup is team-scoped."""

from __future__ import annotations

import json
import logging

from evosparse.api import metrics
from evosparse.api.auth import current_team
from evosparse.api.deps import db_session, get_celery, get_store
from evosparse.api.schemas import ArtifactList, GenerationList, JobList, JobOut, JobSubmit, Status
from evosparse.jobs import repo
from evosparse.jobs.db import sessionmaker_for
from evosparse.jobs.store import LocalStore, Store
from evosparse.jobs.validation import SpecRejected, check_spec
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

log = logging.getLogger("evosparse.api")
router = APIRouter(prefix="/v1", tags=["jobs"])


def _not_found() -> HTTPException:
    return HTTPException(status_code=404, detail="job not found")


def _job_or_404(db: Session, team_id: int, job_id: str):  # noqa: ANN202
    job = repo.get_job(db, team_id, job_id) if len(job_id) <= 64 else None
    if job is None:
        raise _not_found()
    return job


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _parse_body(raw: bytes) -> JobSubmit:
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(status_code=400, detail=f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPException(status_code=400, detail="the body must be a JSON object (a job spec)")
    try:
        return JobSubmit.model_validate(data)
    except ValidationError as exc:
        raise HTTPException(status_code=422, detail=exc.errors(include_url=False, include_context=False,
                                                               include_input=False)) from None


@router.post("/jobs", status_code=202)
async def submit_job(request: Request, team_id: int = Depends(current_team)) -> JSONResponse:
    settings = request.app.state.settings
    raw = await request.body()  # the size limit is enforced by BodyLimitMiddleware
    body = _parse_body(raw)
    try:
        spec = check_spec(body.job_spec(), settings)
    except SpecRejected as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    key = request.headers.get("idempotency-key")
    if key is not None and not (1 <= len(key) <= 200):
        raise HTTPException(status_code=400, detail="Idempotency-Key must be 1-200 characters")
    celery = get_celery(request)

    def create() -> tuple[str, str, bool]:
        with sessionmaker_for(settings.resolved_database_url)() as db:
            try:
                job, created = repo.create_job(db, team_id, spec.model_dump(mode="json"), key, body.webhook_url)
            except repo.IdempotencyConflict as exc:
                raise HTTPException(status_code=409, detail=str(exc)) from None
            if created:
                try:
                    celery.send_task("evosparse.run_job", args=[job.id], queue=settings.queue)
                except Exception as exc:  # broker down: leave nothing behind that would never run
                    log.exception("could not enqueue job %s", job.id)
                    repo.delete_job(db, job.id)
                    raise HTTPException(status_code=503, detail=f"job queue unavailable, try again: {exc}") from None
            return job.id, job.status, created

    job_id, status, created = await run_in_threadpool(create)
    if created:
        metrics.JOBS_SUBMITTED.inc()
    location = f"/v1/jobs/{job_id}"
    headers = {"Location": location}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse({"id": job_id, "status": status, "location": location}, status_code=202, headers=headers)


@router.get("/jobs", response_model=JobList)
def list_jobs(request: Request, status: Status | None = None, limit: int = Query(50, ge=1),
              offset: int = Query(0, ge=0), team_id: int = Depends(current_team)) -> dict:
    limit = min(limit, request.app.state.settings.page_limit_max)
    with db_session(request) as db:
        jobs, total = repo.list_jobs(db, team_id, status, limit, offset)
        return {"items": [repo.job_view(j) for j in jobs], "total": total, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(job_id: str, request: Request, team_id: int = Depends(current_team)) -> Response:
    # The dashboards' hot path: async with one primary-key lookup inline (sub-millisecond), which
    # under hundreds of pollers is far cheaper than a threadpool hop per request.
    with db_session(request) as db:
        view = repo.job_view(_job_or_404(db, team_id, job_id))
    return Response(json.dumps(view, separators=(",", ":")), media_type="application/json")


@router.get("/jobs/{job_id}/generations", response_model=GenerationList)
def get_generations(job_id: str, request: Request, team_id: int = Depends(current_team)) -> dict:
    with db_session(request) as db:
        job = _job_or_404(db, team_id, job_id)
        return {"items": [repo.generation_view(g) for g in repo.generations_of(db, job.id)]}


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, request: Request, team_id: int = Depends(current_team)) -> dict:
    with db_session(request) as db:
        job = _job_or_404(db, team_id, job_id)
        return repo.job_view(repo.request_cancel(db, job))


@router.get("/jobs/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job_id: str, request: Request, team_id: int = Depends(current_team)) -> dict:
    with db_session(request) as db:
        job = _job_or_404(db, team_id, job_id)
        items = [{"name": a.name, "size": a.size, "sha256": a.sha256,
                  "url": f"/v1/jobs/{job.id}/artifacts/{a.name}"} for a in repo.artifacts_of(db, job.id)]
    return {"items": items}


@router.get("/jobs/{job_id}/artifacts/{name:path}")
def get_artifact(job_id: str, name: str, request: Request, redirect: bool = False,
                 team_id: int = Depends(current_team), store: Store = Depends(get_store)):  # noqa: ANN201
    with db_session(request) as db:
        job = _job_or_404(db, team_id, job_id)
        art = next((a for a in repo.artifacts_of(db, job.id) if a.name == name), None)
    if art is None:
        raise HTTPException(status_code=404, detail="artifact not found")
    key = store.key_of(art.uri)
    headers = {"X-Checksum-Sha256": art.sha256}
    if isinstance(store, LocalStore):
        return FileResponse(store.local_path(key), filename=name.rsplit("/", 1)[-1], headers=headers)
    if redirect:
        url = store.presigned_url(key, request.app.state.settings.presign_expiry_s)
        return RedirectResponse(url, status_code=307)
    headers["Content-Length"] = str(art.size)
    return StreamingResponse(store.iter_chunks(key), media_type="application/octet-stream", headers=headers)
