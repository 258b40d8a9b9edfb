"""/v1/jobs: submit, list, get, generation history, cancel, artifacts. Every lookup is team-scoped."""

from __future__ import annotations

import csv
import io
import json
import logging
import re

from evosparse.api import metrics
from evosparse.api.auth import current_team
from evosparse.api.deps import db_session, get_store
from evosparse.api.schemas import ArtifactList, GenerationList, JobList, JobOut, JobSubmit, Status, Submitted
from evosparse.jobs import queue, repo
from evosparse.jobs.listing import DEFAULT_SORT, SORT_KEYS, SORT_PATTERN, check_search, parse_label_filters
from evosparse.jobs.netguard import UrlRefused, check_url
from evosparse.jobs.spec import check_name
from evosparse.jobs.store import LocalStore, Store
from evosparse.jobs.validation import SpecRejected, check_spec
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

log = logging.getLogger("evosparse.api")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def parse_json_object(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says why (never a 500).

    Stricter than FastAPI's own parsing: NaN/Infinity literals are refused (they are not JSON), and
    nesting deep enough to exhaust the parser's recursion is a 400 too.
    """
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(status_code=400, detail=f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise HTTPException(status_code=400, detail="malformed JSON body: nested too deeply") from None
    if not isinstance(data, dict):
        raise HTTPException(status_code=400, detail="the body must be a JSON object (a job spec)")
    return data


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


class _StrictJsonRequest(Request):
    async def json(self) -> dict:
        if not hasattr(self, "_json"):
            self._json = parse_json_object(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """Routes whose body is parsed by ``parse_json_object`` and then validated as the declared
    pydantic model (so /openapi.json documents it). The body is read as JSON whatever the
    Content-Type says, as before (``curl -d`` sends a form content type)."""

    def get_route_handler(self):  # noqa: ANN201
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            scope = request.scope
            body = None
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
                # Read here, outside FastAPI's own body handling, so that the body limit's 413
                # (raised while streaming) reaches BodyLimitMiddleware instead of becoming a 400.
                body = await request.body()
            strict = _StrictJsonRequest(scope, request.receive)
            if body is not None:
                strict._body = body
            return await handler(strict)

        return strict_handler


router = APIRouter(prefix="/v1", tags=["jobs"], route_class=StrictJsonRoute)


def _not_found() -> HTTPException:
    return HTTPException(status_code=404, detail="job not found")


def _job_or_404(db: Session, team_id: int, job_id: str):  # noqa: ANN202
    # Job ids are 32 hex digits; anything else (NUL bytes, 10 KB strings) never reaches the database.
    job = repo.get_job(db, team_id, job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise _not_found()
    return job


_SUBMIT_RESPONSES = {
    400: {"description": "malformed JSON, or a spec or webhook_url this server refuses"},
    409: {"description": "Idempotency-Key reused with a different spec or webhook_url"},
    413: {"description": "body too large"},
    429: {"description": "the team has too many queued jobs or requests; see Retry-After"},
    503: {"description": "job queue unavailable; nothing was created"},
}


@router.post("/jobs", status_code=202, response_model=Submitted, responses=_SUBMIT_RESPONSES)
def submit_job(body: JobSubmit, request: Request, team_id: int = Depends(current_team),
               idempotency_key: str | None = Header(None, alias="Idempotency-Key",
                                                    description="resubmitting with the same key returns "
                                                                "the same job (1-200 characters)")
               ) -> JSONResponse:
    """Submit a pruning job (202 + id). Runs in the threadpool: it resolves the webhook host."""
    settings = request.app.state.settings
    try:
        spec = check_spec(body.job_spec(), settings)
    except SpecRejected as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    key = idempotency_key
    if key is not None and not (1 <= len(key) <= 200):
        raise HTTPException(status_code=400, detail="Idempotency-Key must be 1-200 characters")
    if body.webhook_url is not None:
        try:  # resolves the host now; the worker checks again before each delivery
            check_url(body.webhook_url, settings.webhook_allow_hosts, settings.webhook_allow_networks)
        except UrlRefused as exc:
            raise HTTPException(status_code=400, detail=f"webhook_url: {exc}") from None
    with db_session(request) as db:
        replay = key is not None and repo.get_by_idempotency(db, team_id, key) is not None
        cap = settings.max_queued_per_team
        if cap and not replay and repo.queued_count(db, team_id) >= cap:
            raise HTTPException(status_code=429, detail=f"this team already has {cap} queued jobs; "
                                                        f"wait for some to start", headers={"Retry-After": "30"})
        try:
            job, created = repo.create_job(db, team_id, spec.model_dump(mode="json"), key, body.webhook_url)
        except repo.IdempotencyConflict as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        if created:
            try:
                queue.enqueue(settings, job.id)
            except queue.QueueUnavailable:  # leave nothing behind that would never run
                repo.delete_job(db, job.id)
                raise HTTPException(status_code=503, detail="job queue unavailable, try again") from None
        job_id, status = job.id, job.status
    if created:
        metrics.JOBS_SUBMITTED.inc()
    location = f"/v1/jobs/{job_id}"
    headers = {"Location": location}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse({"id": job_id, "status": status, "location": location}, status_code=202, headers=headers)


@router.get("/jobs", response_model=JobList)
def list_jobs(request: Request, status: Status | None = None, limit: int = Query(50, ge=1, le=1_000_000),
              offset: int = Query(0, ge=0, le=1_000_000_000),
              name: str | None = Query(None, max_length=100, description="jobs with exactly this name"),
              label: list[str] = Query([], max_length=20, description=(
                  "key=value: jobs with that label value; key: jobs with that label (repeat: all must hold)")),
              q: str | None = Query(None, max_length=100, description=(
                  "search: the start of the id, or part of the name or model (case-insensitive)")),
              sort: str = Query(DEFAULT_SORT, pattern=SORT_PATTERN, description=(
                  "column to sort by, '-' in front for descending: " + ", ".join(SORT_KEYS))),
              team_id: int = Depends(current_team)) -> dict:
    limit = min(limit, request.app.state.settings.page_limit_max)
    if name is not None:
        try:
            check_name(name)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=f"name filter: {exc}") from None
    try:
        labels = parse_label_filters(label)
        search = check_search(q or "") or None
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=f"filter: {exc}") from None
    where = repo.JobFilter(name=name, labels=labels, search=search)
    with db_session(request) as db:
        jobs, total = repo.list_jobs(db, team_id, status, limit, offset, where=where, sort=sort)
        return {"items": [repo.job_view(j) for j in jobs], "total": total, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, request: Request, team_id: int = Depends(current_team)) -> Response:
    # The dashboards' hot path: serialised once with json.dumps (no response-model round trip);
    # sync, so its database lookup runs in the threadpool, off the event loop.
    with db_session(request) as db:
        view = repo.job_view(_job_or_404(db, team_id, job_id))
    return Response(json.dumps(view, separators=(",", ":")), media_type="application/json")


@router.get("/jobs/{job_id}/generations", response_model=GenerationList)
def get_generations(job_id: str, request: Request, team_id: int = Depends(current_team)) -> dict:
    with db_session(request) as db:
        job = _job_or_404(db, team_id, job_id)
        return {"items": [repo.generation_view(g) for g in repo.generations_of(db, job.id)]}


CSV_COLUMNS = ("generation", "attempt", "best", "mean", "tokens", "seconds")


def generations_csv(generations: list[dict], units: list[str] | None) -> str:
    """One row per generation; the best vector spread over one column per searched unit."""
    width = max((len(g["best_vector"] or []) for g in generations), default=0)
    names = units if units and len(units) == width else [f"unit_{i}" for i in range(width)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *names])
    for g in generations:
        vector = list(g["best_vector"] or [])
        writer.writerow([*("" if g[c] is None else g[c] for c in CSV_COLUMNS), *vector, *[""] * (width - len(vector))])
    return out.getvalue()


@router.get("/jobs/{job_id}/generations.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}, "description": "the generation history as CSV"}})
def get_generations_csv(job_id: str, request: Request, team_id: int = Depends(current_team)) -> Response:
    """The generation history as CSV (a spreadsheet or pandas reads it as is)."""
    with db_session(request) as db:
        job = _job_or_404(db, team_id, job_id)
        rows = [repo.generation_view(g) for g in repo.generations_of(db, job.id)]
        units = ((job.report or {}).get("search") or {}).get("units")
    return Response(generations_csv(rows, units if isinstance(units, list) else None), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}-generations.csv"'})


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, request: Request, team_id: int = Depends(current_team)) -> dict:
    with db_session(request) as db:
        job = _job_or_404(db, team_id, job_id)
        view = repo.job_view(repo.request_cancel(db, job))
        delivery = repo.pending_delivery_of(db, job.id)
    if delivery is not None:  # a queued job cancelled now has its webhook to send
        try:
            queue.enqueue_webhook(request.app.state.settings, delivery)
        except queue.QueueUnavailable:
            pass  # the workers' sweeper sends due deliveries
    return view


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
