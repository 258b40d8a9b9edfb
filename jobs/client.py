"""Small Python client of the evosparse REST API (used by `evosparse submit` and release pipelines).

    client = Client("http://127.0.0.1:8000", key)
    job = client.submit({"model": "smollm2-135m", "sparsity": 0.6})
    done = client.wait(job["id"], timeout=3600)
    client.download(job["id"], "out/")

Transient failures (connection errors, 502/503/504) are retried with backoff; a POST is safe to
retry because every submission carries an Idempotency-Key.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from evosparse.jobs.status import TERMINAL

DEFAULT_SERVER = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class ClientSettings:
    """Where a client connects, and with which key: ``EVOSPARSE_SERVER`` and ``EVOSPARSE_API_KEY``.

    The client-side counterpart of jobs/settings.py (which needs the [server] extra): these two
    variables are read here and nowhere else, by ``Client.from_env`` and ``evosparse submit``.
    """

    server: str = DEFAULT_SERVER
    api_key: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if environ is None else environ
        return cls(server=env.get("EVOSPARSE_SERVER") or DEFAULT_SERVER, api_key=env.get("EVOSPARSE_API_KEY") or None)


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: Any):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class WaitTimeout(TimeoutError):
    pass


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default


class Client:
    def __init__(self, server: str, key: str, timeout: float = 30.0, retries: int = 6,
                 backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None):
        self.http = httpx.Client(base_url=server.rstrip("/"), timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {key}", "User-Agent": "evosparse-client/1"})
        self.retries, self.backoff_s = retries, backoff_s

    @classmethod
    def from_env(cls, **kw: Any) -> Client:
        """A client of $EVOSPARSE_SERVER (default http://127.0.0.1:8000) with the key $EVOSPARSE_API_KEY."""
        settings = ClientSettings.from_env()
        if not settings.api_key:
            raise ValueError("EVOSPARSE_API_KEY is not set")
        return cls(settings.server, settings.api_key, **kw)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kw)
                if r.status_code not in (429, 502, 503, 504) or attempt == self.retries:
                    break
                if r.status_code == 429:
                    # A short Retry-After (request rate) is waited out; a long one (queued-jobs cap)
                    # is the caller's decision, so it surfaces as an ApiError at once.
                    wait = _retry_after(r.headers.get("Retry-After"), delay)
                    if wait > 10.0:
                        break
                    time.sleep(wait)
                    continue
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            time.sleep(delay * (0.5 + random.random()))  # jitter: many pipelines must not retry in lockstep
            delay = min(delay * 2, 10.0)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r

    def submit(self, spec: dict | Any, idempotency_key: str | None = None, webhook_url: str | None = None) -> dict:
        body = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec)
        if webhook_url:
            body["webhook_url"] = webhook_url
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self._request("POST", "/v1/jobs", json=body, headers=headers).json()

    def get(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def list(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._request("GET", "/v1/jobs", params=params).json()

    def generations(self, job_id: str) -> list[dict]:
        return self._request("GET", f"/v1/jobs/{job_id}/generations").json()["items"]

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def artifacts(self, job_id: str) -> list[dict]:
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()["items"]

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.5, max_poll_s: float = 10.0,
             on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job is terminal (returns it) or ``timeout`` seconds pass (WaitTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_s
        last_progress = None
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} still {job['status']} after {timeout} s")
            # Poll fast while things move, back off while they don't.
            delay = poll_s if job.get("progress") != last_progress else min(delay * 1.5, max_poll_s)
            last_progress = job.get("progress")
            sleep = delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            time.sleep(sleep)

    def download(self, job_id: str, dest: str | Path) -> Path:
        """Download every artifact of a finished job into ``dest``, checking each SHA-256."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for art in self.artifacts(job_id):
            target = (dest / art["name"]).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise ApiError(500, f"refusing artifact name {art['name']!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            h = hashlib.sha256()
            with self.http.stream("GET", art["url"]) as r:
                if r.status_code >= 400:
                    raise ApiError(r.status_code, r.read().decode(errors="replace"))
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
            if h.hexdigest() != art["sha256"]:
                tmp.unlink(missing_ok=True)
                raise ApiError(500, f"checksum mismatch for {art['name']}")
            tmp.replace(target)
        return dest
