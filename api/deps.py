"""Per-request dependencies: settings, a database session, the object store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from evosparse.jobs.db import sessionmaker_for
from evosparse.jobs.settings import Settings
from evosparse.jobs.store import Store, store_from_settings
from fastapi import Request
from sqlalchemy.orm import Session


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


@contextlib.contextmanager
def db_session(request: Request) -> Iterator[Session]:
    """A session opened and closed inside the handler.

    Deliberately not a FastAPI generator dependency: their teardown needs a free threadpool
    thread, and under load every thread can be waiting for a pooled connection that only such a
    teardown would release (a deadlock until the pool timeout).
    """
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
