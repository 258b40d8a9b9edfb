"""Celery application for pruning jobs (Redis broker), tuned for long, expensive tasks.

- late acks + reject on worker lost: a job is acknowledged only when its task returns, so a
  worker that dies (SIGKILL, OOM killer, machine loss) leaves the message to be redelivered;
- prefetch multiplier 1 and concurrency 1: a worker holds exactly the job it runs (one per GPU);
- Redis visibility timeout above the task time limit: a job that is merely slow is never handed
  to a second worker while the first is still on it (the job row's lease guards that too);
- no result backend: the job database is the source of truth.
"""

from __future__ import annotations

from celery import Celery
from evosparse.jobs.settings import Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("evosparse", broker=s.broker_url, include=["evosparse.worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # a task that failed has already marked its job FAILED
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,  # a fresh process per job: no leaked GPU/CPU memory between jobs
        task_time_limit=s.task_time_limit_s,
        # The soft limit lets the task mark its job FAILED with a clear message before the hard kill.
        task_soft_time_limit=max(5, s.task_time_limit_s - max(5, min(60, s.task_time_limit_s // 10))),
        task_default_queue=s.queue,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": s.resolved_visibility_timeout_s,
            "unacked_restore_interval": s.restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


app = make_celery()
