"""The job queue as the API and the workers see it: send a job or webhook message, ask the broker.

Only task *names* cross this boundary (``send_task``), so the API never imports the worker or its
Celery tasks. The database, not the broker, is the source of truth: a message only says "a job may
start" or "a delivery is due", and the sweeper re-sends what the broker lost (worker/tasks.py).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from evosparse.jobs.settings import Settings

log = logging.getLogger("evosparse.queue")

RUN_JOB = "evosparse.run_job"
DELIVER_WEBHOOK = "evosparse.deliver_webhook"
# Publishing with the broker down fails after about a second instead of hanging the request.
_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 0.5}


class QueueUnavailable(RuntimeError):
    """The broker did not take the message (the detail is logged, never shown to users)."""


def _producer(broker_url: str):  # noqa: ANN202 - celery.Celery
    # Per process: a forked child must not write to the sockets of its parent's connection pool.
    return _producer_of(broker_url, os.getpid())


@lru_cache(maxsize=8)
def _producer_of(broker_url: str, _pid: int):  # noqa: ANN202 - celery.Celery
    from celery import Celery

    app = Celery("evosparse-producer", broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_timeout=2,
                    broker_connection_retry_on_startup=False, broker_connection_max_retries=1)
    return app


def _send(settings: Settings, name: str, arg: str, queue: str, countdown: float | None = None) -> None:
    try:
        _producer(settings.broker_url).send_task(name, args=[arg], queue=queue, retry=True, retry_policy=_RETRY,
                                                 countdown=countdown)
    except Exception as exc:  # noqa: BLE001 - kombu raises many types; all mean "not queued"
        log.warning("broker refused %s for %s: %s", name, arg, type(exc).__name__)
        raise QueueUnavailable("job queue unavailable") from exc


def enqueue(settings: Settings, job_id: str) -> None:
    """Announce a QUEUED job to the workers. Raises QueueUnavailable."""
    _send(settings, RUN_JOB, job_id, settings.queue)


def enqueue_webhook(settings: Settings, delivery_id: str, countdown: float | None = None) -> None:
    """Ask the webhook workers to (re)try a delivery, optionally not before ``countdown`` seconds."""
    _send(settings, DELIVER_WEBHOOK, delivery_id, settings.resolved_webhook_queue, countdown)


def queue_length(settings: Settings, queue: str | None = None) -> int:
    """Messages waiting in a queue (not counting those a worker holds). Raises QueueUnavailable."""
    name = queue or settings.queue
    try:
        with _producer(settings.broker_url).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            ok = conn.default_channel.queue_declare(queue=name, passive=False, durable=True, auto_delete=False)
            return int(ok.message_count)
    except Exception as exc:  # noqa: BLE001
        raise QueueUnavailable("job queue unavailable") from exc


def broker_ok(settings: Settings, timeout_s: float = 2.0) -> bool:
    """True when the broker answers (used by /healthz)."""
    try:
        with _producer(settings.broker_url).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
            client = getattr(conn.default_channel, "client", None)
            if client is not None:
                client.ping()
        return True
    except Exception:  # noqa: BLE001
        return False
