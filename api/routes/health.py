"""Liveness/readiness (no auth) and Prometheus metrics (token, or loopback clients only)."""

from __future__ import annotations

import hmac

from evosparse.api import metrics
from evosparse.jobs import queue
from evosparse.jobs.db import engine_for
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

router = APIRouter(tags=["health"])
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """200 when the database and the broker answer, else 503 naming what failed (never how)."""
    settings = request.app.state.settings
    checks: dict[str, str] = {}
    try:
        with engine_for(settings.resolved_database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # report, don't raise: health endpoints must answer
        checks["database"] = f"error: {type(exc).__name__}"
    # Without a broker no job can be queued: the API is not ready even if it answers.
    checks["broker"] = "ok" if queue.broker_ok(settings, timeout_s=1.0) else "error: unreachable"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "degraded", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics")
def prometheus(request: Request) -> Response:
    """Prometheus metrics. With EVOSPARSE_METRICS_TOKEN set, ``Authorization: Bearer <token>`` is
    required; without it only loopback clients are answered (job counts of all teams are not public)."""
    settings = request.app.state.settings
    token = settings.metrics_token
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(status_code=401, detail="metrics need the metrics token",
                                headers={"WWW-Authenticate": "Bearer"})
    elif (request.client.host if request.client else "") not in _LOOPBACK:
        raise HTTPException(status_code=403, detail="metrics are served to loopback clients only unless "
                                                    "EVOSPARSE_METRICS_TOKEN is set")
    body, content_type = metrics.render(settings)
    return Response(body, media_type=content_type)
