"""FastAPI app factory. ``uvicorn evosparse.api.main:app`` or ``uvicorn --factory evosparse.api.main:create_app``."""

from __future__ import annotations

import logging

from evosparse.api.metrics import MetricsMiddleware
from evosparse.api.routes import dashboard, docs, health, jobs
from evosparse.jobs.log import configure_logging
from evosparse.jobs.settings import Settings, get_settings
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from evosparse import __version__

log = logging.getLogger("evosparse.api")


class BodyLimitMiddleware:
    """413 for bodies above the limit, whether announced by Content-Length or streamed chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        response = JSONResponse({"detail": f"request body larger than {self.max_bytes} bytes"}, status_code=413)
        await response({"type": "http"}, _empty_receive, send)


class _TooLarge(Exception):
    pass


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(settings: Settings | None = None, migrate: bool = True) -> FastAPI:
    settings = settings or get_settings()
    configure_logging()  # JSON lines by default (EVOSPARSE_LOG_FORMAT=text for a terminal)
    if migrate:
        from evosparse.jobs.db import migrate as run_migrations

        run_migrations(settings.resolved_database_url)
    app = FastAPI(title="evosparse", version=__version__, docs_url=None, redoc_url=None,
                  description="Per-layer sparsity search and pruning for LLMs, as a job service.")
    app.state.settings = settings
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(dashboard.router)
    app.include_router(docs.router)  # /docs from local assets (FastAPI's own loads a CDN)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            loc = list(e.get("loc", ()))
            if len(loc) > 1 and loc[0] == "body":
                loc = loc[1:]  # body fields are named as in the job spec ("sparsity", "search.generations")
            errors.append({"loc": loc, "msg": str(e.get("msg", ""))[:500], "type": e.get("type")})
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    # `uvicorn evosparse.api.main:app` builds the app on first access, not at import (tests import this module).
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
