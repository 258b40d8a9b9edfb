"""Per-request dependencies: settings, a database session, the object store, the Celery app."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

from jobs.db import sessionmaker_for
from jobs.settings import Settings
from jobs.store import Store, store_from_settings


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    session = sessionmaker_for(request.app.state.settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


def get_store(request: Request) -> Store:
    state = request.app.state
    if getattr(state, "store", None) is None:
        state.store = store_from_settings(state.settings)
    return state.store


def get_celery(request: Request):  # noqa: ANN201 - celery.Celery
    state = request.app.state
    if getattr(state, "celery", None) is None:
        from worker.celery_app import make_celery

        state.celery = make_celery(state.settings)
    return state.celery
