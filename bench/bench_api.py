"""API benchmark: status polling under load while a job runs, and submission throughput.

Starts the one-machine service on loopback (embedded Redis, SQLite, local store, uvicorn with
--api-workers processes, one Celery worker), submits a long evolutionary job on a tiny Llama so a
job really runs (and competes for the CPU) during the measurement, then:

1. polling: `--clients` concurrent clients GET /v1/jobs/{id} for `--seconds`; each client waits
   `--interval` seconds between its requests (0 = closed loop, as fast as the server answers);
2. submission: `--submitters` concurrent clients POST /v1/jobs for `--submit-seconds` (the worker is
   stopped first, so this measures validation + database insert + broker enqueue; the queued jobs
   are cancelled afterwards).

Latencies are measured by the client (request sent -> response read) with time.perf_counter.

    python bench/bench_api.py --clients 200 --seconds 30 --interval 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class _Conn:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams.

    httpx costs more CPU per request than the API itself on this 2-core machine, which would make
    the load generator the bottleneck; this client only writes a fixed request and reads the
    status line, headers and Content-Length body.
    """

    def __init__(self, host: str, port: int, request: bytes):
        self.host, self.port, self.request = host, port, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def poll_load(url: str, key: str, job_id: str, clients: int, seconds: float, interval: float) -> dict:
    from urllib.parse import urlparse

    u = urlparse(url)
    request = (f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
               f"Authorization: Bearer {key}\r\nAccept: application/json\r\n\r\n").encode()
    lat: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.perf_counter() + seconds

    async def one(i: int) -> None:
        conn = _Conn(u.hostname, u.port, request)
        await asyncio.sleep(interval * i / clients)  # spread the clients over one interval
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(conn.get(), 10.0)
                    dt = time.perf_counter() - t0
                    if status == 200 and body.startswith(b'{"id"'):
                        lat.append(dt)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    conn.close()
                    dt = time.perf_counter() - t0
                if interval:
                    await asyncio.sleep(max(0.0, interval - dt))
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "errors": errors, "wall_s": wall, "rps": len(lat) / wall,
            "p50_ms": 1000 * pct(lat, 0.50), "p90_ms": 1000 * pct(lat, 0.90), "p99_ms": 1000 * pct(lat, 0.99),
            "max_ms": 1000 * max(lat) if lat else float("nan"),
            "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan")}


async def submit_load(url: str, key: str, spec: dict, submitters: int, seconds: float) -> tuple[dict, list[str]]:
    lat: list[float] = []
    ids: list[str] = []
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30.0) as http:
        stop_at = time.perf_counter() + seconds

        async def one(i: int) -> None:
            n = 0
            while time.perf_counter() < stop_at:
                n += 1
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/jobs", json={**spec, "seed": 1000 + i * 100000 + n},
                                        headers={"Idempotency-Key": f"bench-{i}-{n}-{time.time_ns()}"})
                    if r.status_code == 202:
                        lat.append(time.perf_counter() - t0)
                        ids.append(r.json()["id"])
                    else:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(submitters)))
        wall = time.perf_counter() - t0
    return ({"submitted": len(lat), "errors": errors, "wall_s": wall, "jobs_per_s": len(lat) / wall,
             "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99)}, ids)


def run(coro):  # noqa: ANN001, ANN201
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("API did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--interval", type=float, nargs="+", default=[1.0],
                    help="seconds between one client's polls; several values run several rounds")
    ap.add_argument("--api-workers", type=int, default=2)
    ap.add_argument("--submitters", type=int, default=20)
    ap.add_argument("--submit-seconds", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads of the running job (EVOSPARSE_TORCH_THREADS); 1 leaves a core to the API")
    args = ap.parse_args()

    from evosparse.cli.service_cmd import celery_worker_cmd, start_embedded_redis, stop_processes
    from evosparse.jobs import repo
    from evosparse.jobs.db import migrate, session_scope
    from evosparse.pruning.tiny import save_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="evs-bench-"))
    models = tmp / "models"
    save_tiny_llama(models / "tiny")
    data = tmp / "data"
    db_url = f"sqlite:///{data / 'evosparse.db'}"
    migrate(db_url)
    redis, broker = start_embedded_redis(data / "redis.db")
    env = dict(os.environ, EVOSPARSE_DATA_DIR=str(data), EVOSPARSE_DATABASE_URL=db_url, EVOSPARSE_BROKER_URL=broker,
               EVOSPARSE_ALLOWED_MODEL_ROOTS=str(models), EVOSPARSE_MAX_GENERATIONS="100000",
               EVOSPARSE_TORCH_THREADS=str(args.torch_threads),
               # the benchmark is one team on purpose (200 pollers, many submitters): no per-team caps
               EVOSPARSE_RATE_LIMIT_PER_S="0", EVOSPARSE_MAX_QUEUED_PER_TEAM="0")
    log = open(tmp / "service.log", "w")
    worker = subprocess.Popen(celery_worker_cmd("evosparse", "bench@%h"), env=env, stdout=log, stderr=log,
                              cwd=tmp)
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "evosparse.api.main:create_app", "--host",
                            "127.0.0.1", "--port", str(args.port), "--workers", str(args.api_workers),
                            "--no-access-log", "--log-level", "warning"], env=env, stdout=log, stderr=log, cwd=ROOT)
    procs = [worker, api]
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_http(url)
        with session_scope(db_url) as db:
            key, _ = repo.create_api_key(db, "bench")
        base = {"model": str(models / "tiny"), "sparsity": 0.5, "calib_windows": 4, "eval_windows": 2, "seq_len": 32}
        long_job = {**base, "allocation": "evolutionary",
                    "search": {"generations": 100000, "offspring": 4, "selection": "64:2,128:1", "seed_from": "uniform"}}
        h = {"Authorization": f"Bearer {key}"}
        job_id = httpx.post(url + "/v1/jobs", json=long_job, headers=h).json()["id"]
        deadline = time.monotonic() + 180
        while httpx.get(f"{url}/v1/jobs/{job_id}", headers=h).json()["generation"] is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the background job did not reach its search stage")
            time.sleep(0.5)
        print(f"# API workers: {args.api_workers}; job torch threads: {args.torch_threads}; background job {job_id} is in its search "
              f"(generation {httpx.get(f'{url}/v1/jobs/{job_id}', headers=h).json()['generation']})")
        results = []
        for interval in args.interval:
            res = run(poll_load(url, key, job_id, args.clients, args.seconds, interval))
            res["interval_s"] = interval
            results.append(res)
            print(f"poll  clients={args.clients} interval={interval}s  requests={res['requests']}  "
                  f"rps={res['rps']:.0f}  p50={res['p50_ms']:.1f}ms  p90={res['p90_ms']:.1f}ms  "
                  f"p99={res['p99_ms']:.1f}ms  max={res['max_ms']:.1f}ms  errors={res['errors'] or 0}", flush=True)
        after = httpx.get(f"{url}/v1/jobs/{job_id}", headers=h).json()
        print(f"# background job still {after['status']} at generation {after['generation']}")
        httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers=h)
        stop_processes([worker], grace_s=30)
        sub, ids = run(submit_load(url, key, base, args.submitters, args.submit_seconds))
        print(f"submit submitters={args.submitters}  submitted={sub['submitted']}  "
              f"jobs/s={sub['jobs_per_s']:.0f}  p50={sub['p50_ms']:.1f}ms  p99={sub['p99_ms']:.1f}ms  "
              f"errors={sub['errors'] or 0}", flush=True)
        for jid in ids:  # leave nothing queued behind
            httpx.post(f"{url}/v1/jobs/{jid}/cancel", headers=h)
    finally:
        stop_processes(procs, grace_s=20)
        redis.shutdown()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
