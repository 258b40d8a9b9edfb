"""Structured logs for the service: one JSON object per line, carrying the job id.

    from evosparse.jobs.log import configure_logging, job_context
    configure_logging()                       # once per process (API, worker, CLI)
    with job_context(job_id):                 # everything logged inside carries job_id
        log.info("pruning started")

Format and level come from the settings (jobs/settings.py): ``EVOSPARSE_LOG_FORMAT`` = ``json``
(default for services; what log collectors want) or ``text`` (for a terminal),
``EVOSPARSE_LOG_LEVEL`` (default ``INFO``). A record's ``extra={...}`` fields become JSON keys.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterator

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("evosparse_job_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged too.
# uvicorn's color_message is its message with terminal colour codes: noise in a JSON line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "job_id",
                                                                            "color_message"}
_HANDLER_NAME = "evosparse"
# uvicorn installs its own handlers on these (plain text, not propagated); configure_logging sends
# their records to the root handler instead, so a server's whole output is one format.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


@contextlib.contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Tag every record logged in this block (this thread / task) with ``job_id``."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def current_job_id() -> str | None:
    return _job_id.get()


class JobIdFilter(logging.Filter):
    """Puts the current job id on each record (an explicit ``extra={"job_id": ...}`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        return True


# scheme://user:password@host -> password hidden; ?query and #fragment of any URL -> hidden (tokens
# travel there: webhook URLs with ?token=..., presigned S3 URLs).
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*):[^/\s@]*@")
_URL_QUERY = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"']*)[?#][^\s\"']*")


def redact(text: str) -> str:
    """``text`` with URL passwords and URL query strings replaced by ``***``."""
    return _URL_QUERY.sub(r"\1?***", _URL_PASSWORD.sub(r"\1:***@", text))


class RedactFilter(logging.Filter):
    """Applies ``redact`` to every record's message and exception text before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the formatter's problem
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, job_id, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable line with the job id in brackets when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(job)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job_id", None)
        record.job = f" [job {job}]" if job else ""
        return super().format(record)


def configure_logging(fmt: str | None = None, level: str | int | None = None, stream=None) -> logging.Handler:  # noqa: ANN001
    """Install (or replace) evosparse's handler on the root logger; safe to call more than once."""
    if fmt is None or level is None:  # EVOSPARSE_LOG_FORMAT / EVOSPARSE_LOG_LEVEL, through the settings
        from evosparse.jobs.settings import get_settings

        settings = get_settings()
        fmt, level = fmt or settings.log_format, level or settings.log_level
    fmt = fmt.lower()
    if fmt not in ("json", "text"):
        raise ValueError(f"log format (EVOSPARSE_LOG_FORMAT) must be 'json' or 'text', got {fmt!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(JobIdFilter())
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else str(level).upper())
    for name in UVICORN_LOGGERS:
        uv = logging.getLogger(name)
        for h in list(uv.handlers):
            uv.removeHandler(h)
        uv.propagate = True
    # httpx logs every request URL at INFO; the webhook sender logs its own (redacted) outcome.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return handler


def uvicorn_log_config() -> dict:
    """A ``logging.config.dictConfig`` for uvicorn's ``--log-config`` (as a JSON file): uvicorn's
    supervisor process logs before any app is loaded, so it must be given our format up front."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {_HANDLER_NAME: {"()": "evosparse.jobs.log.configure_logging"}},
        "loggers": {name: {"handlers": [], "propagate": True} for name in UVICORN_LOGGERS},
    }
