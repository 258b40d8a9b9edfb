"""Liveness/readiness and Prometheus metrics (no auth)."""

from __future__ import annotations

from evosparse.api import metrics
from evosparse.jobs.db import engine_for
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """200 when the database answers; the broker is reported but does not fail the check."""
    settings = request.app.state.settings
    checks: dict[str, str] = {}
    ok = True
    try:
        with engine_for(settings.resolved_database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # report, don't raise: health endpoints must answer
        ok = False
        checks["database"] = f"error: {type(exc).__name__}"
    return JSONResponse({"status": "ok" if ok else "degraded", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics")
def prometheus(request: Request) -> Response:
    body, content_type = metrics.render(request.app.state.settings)
    return Response(body, media_type=content_type)
