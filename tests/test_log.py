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
