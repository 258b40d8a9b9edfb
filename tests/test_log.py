"""jobs/log.py: JSON lines with the job id, from a context or an explicit extra."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest
from evosparse.jobs.log import configure_logging, job_context


@pytest.fixture
def capture():
    buf = io.StringIO()
    handler = configure_logging("json", "INFO", stream=buf)
    yield buf
    logging.getLogger().removeHandler(handler)


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_carry_the_job_id_of_their_context(capture) -> None:
    log = logging.getLogger("evosparse.test")
    log.info("outside")
    with job_context("job-123"):
        log.warning("inside %d", 7, extra={"stage": "search"})
    [a, b] = _lines(capture)
    assert a["job_id"] is None and a["message"] == "outside"
    assert b["job_id"] == "job-123" and b["message"] == "inside 7"
    assert b["level"] == "WARNING" and b["logger"] == "evosparse.test" and b["stage"] == "search"
    assert b["ts"].endswith("Z")


def test_context_is_per_thread_and_exceptions_are_kept(capture) -> None:
    log = logging.getLogger("evosparse.test")

    def other() -> None:
        log.info("other thread")

    with job_context("job-A"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    records = {r["message"]: r for r in _lines(capture)}
    assert records["other thread"]["job_id"] is None  # a new thread does not inherit the job
    assert records["failed"]["job_id"] == "job-A"
    assert "RuntimeError: boom" in records["failed"]["exception"]


def test_configure_twice_keeps_one_handler_and_rejects_bad_format() -> None:
    root = logging.getLogger()
    h1 = configure_logging("text", stream=io.StringIO())
    h2 = configure_logging("text", stream=io.StringIO())
    try:
        assert h1 not in root.handlers and h2 in root.handlers
        with pytest.raises(ValueError, match="EVOSPARSE_LOG_FORMAT"):
            configure_logging("xml")
    finally:
        root.removeHandler(h2)


def test_uvicorns_own_lines_come_out_as_json(capsys) -> None:
    """`evosparse serve` hands uvicorn this dictConfig (--log-config): its supervisor logs before any
    app exists. In a process that loads the app, configure_logging takes uvicorn's loggers over too."""
    import logging.config

    import uvicorn.config
    from evosparse.jobs.log import UVICORN_LOGGERS, uvicorn_log_config

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)  # what uvicorn installs by default
        logging.config.dictConfig(uvicorn_log_config())
        logging.getLogger("uvicorn.error").info("Started parent process [%d]", 41, extra={"color_message": "\x1b[1m"})
        buf = io.StringIO()
        logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)  # uvicorn configured first, then the app
        configure_logging("json", "INFO", stream=buf)
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/v1/jobs", "1.1", 200)
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        for name in UVICORN_LOGGERS:
            logging.getLogger(name).handlers.clear()
    [supervisor] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert supervisor["logger"] == "uvicorn.error" and supervisor["message"] == "Started parent process [41]"
    assert "color_message" not in supervisor  # uvicorn's terminal-colour copy of the message stays out
    server, access = _lines(buf)
    assert (server["logger"], server["message"]) == ("uvicorn.error", "Started server process [42]")
    assert access["logger"] == "uvicorn.access" and "GET /v1/jobs" in access["message"]
