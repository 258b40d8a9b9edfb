"""Job statuses: defined once here, read by the database tables, the API schema, the client and metrics.

Pure Python (no sqlalchemy, no pydantic): the client-only install (``pip install evosparse``)
imports it to know when a job is finished.
"""

from __future__ import annotations

from typing import Literal, get_args

Status = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
STATUSES: tuple[str, ...] = get_args(Status)
# A job in one of these never changes again (the worker skips it; pollers stop).
TERMINAL: frozenset[str] = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})

assert TERMINAL <= set(STATUSES)
