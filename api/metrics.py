"""Prometheus metrics: request counts/latency per route, jobs submitted, and jobs per status.

Jobs per status are read from the database at scrape time, so they are right whatever process
(API worker, Celery worker) changed them. Request metrics are per process unless
PROMETHEUS_MULTIPROC_DIR is set (multi-worker uvicorn), in which case they are aggregated.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Receive, Scope, Send

REQUESTS = Counter("evosparse_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("evosparse_http_request_seconds", "HTTP request latency", ["method", "route"],
                    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
JOBS_SUBMITTED = Counter("evosparse_jobs_submitted_total", "Jobs accepted by POST /v1/jobs")


class _JobStatusCollector:
    def __init__(self, settings):  # noqa: ANN001
        self.settings = settings

    def collect(self):  # noqa: ANN201
        from evosparse.jobs.db import sessionmaker_for
        from evosparse.jobs.models import Job
        from evosparse.jobs.status import STATUSES
        from sqlalchemy import func, select

        g = GaugeMetricFamily("evosparse_jobs", "Jobs by status", labels=["status"])
        counts = dict.fromkeys(STATUSES, 0)
        try:
            with sessionmaker_for(self.settings.resolved_database_url)() as db:
                for status, n in db.execute(select(Job.status, func.count()).group_by(Job.status)):
                    counts[status] = n
        except Exception:  # a scrape must not fail because the database blinked
            return
        for status, n in counts.items():
            g.add_metric([status], n)
        yield g


def render(settings) -> tuple[bytes, str]:  # noqa: ANN001
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        for collector in (REQUESTS, LATENCY, JOBS_SUBMITTED):
            registry.register(collector)
        del REGISTRY
    registry.register(_JobStatusCollector(settings))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times requests by route template (not raw path, to bound label cardinality)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):  # noqa: ANN001
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], name, str(status["code"])).inc()
            LATENCY.labels(scope["method"], name).observe(time.perf_counter() - start)
