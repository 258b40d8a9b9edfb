"""Python client of the evosparse REST API (used by `evosparse submit` and release pipelines).

    client = Client("http://127.0.0.1:8000", key)
    sub = client.submit({"model": "smollm2-135m", "sparsity": 0.6, "name": "nightly"})
    job = client.wait(sub.id, timeout=3600)     # a JobOut; JobFailed / JobCancelled / WaitTimeout
    client.download(sub.id, "out/")             # ChecksumMismatch if a file arrives damaged

Answers are the API's own pydantic models (api/schemas.py: Submitted, JobOut, JobList, ...). Error
answers raise ApiError, or its subclasses NotFound (404), Conflict (409) and RateLimited (429).
``AsyncClient`` is the same client for asyncio code.

Transient failures (connection errors, 502/503/504) are retried with backoff; a 429 is retried after
its Retry-After when that is short. A POST is safe to retry because every submission carries an
Idempotency-Key.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from evosparse.api.schemas import ArtifactOut, GenerationOut, JobList, JobOut, Submitted
from evosparse.jobs.status import TERMINAL

DEFAULT_SERVER = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# A longer Retry-After (the queued-jobs cap says 30 s) is the caller's decision: RateLimited at once.
MAX_RETRY_AFTER_S = 10.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class ClientSettings:
    """Where a client connects, and with which key: ``EVOSPARSE_SERVER`` and ``EVOSPARSE_API_KEY``.

    The client-side counterpart of jobs/settings.py (which needs the [server] extra): these two
    variables are read here and nowhere else, by ``Client.from_env`` and the `evosparse` client verbs.
    """

    server: str = DEFAULT_SERVER
    api_key: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if environ is None else environ
        return cls(server=env.get("EVOSPARSE_SERVER") or DEFAULT_SERVER, api_key=env.get("EVOSPARSE_API_KEY") or None)


# --- errors ---------------------------------------------------------------------------------------

class ClientError(RuntimeError):
    """Base of the errors this client raises (connection failures stay httpx.TransportError)."""


class ApiError(ClientError):
    """The server answered with an error status."""

    def __init__(self, status: int, detail: Any):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class NotFound(ApiError):
    """404: no such job (or artifact) for this key's team."""


class Conflict(ApiError):
    """409: the Idempotency-Key was used before with a different spec."""


class RateLimited(ApiError):
    """429 with a Retry-After too long to wait out here (or retries used up)."""

    def __init__(self, status: int, detail: Any, retry_after: float | None):
        super().__init__(status, detail)
        self.retry_after = retry_after


class ChecksumMismatch(ClientError):
    """A downloaded file's SHA-256 differs from the one the server recorded; nothing was kept."""

    def __init__(self, name: str, expected: str, actual: str):
        super().__init__(f"checksum mismatch for {name}: expected sha256 {expected}, got {actual}")
        self.name, self.expected, self.actual = name, expected, actual


class JobNotSucceeded(ClientError):
    """``wait`` saw the job end without succeeding; ``job`` is its final state."""

    def __init__(self, job: JobOut):
        super().__init__(f"job {job.id} {job.status}" + (f": {job.error}" if job.error else ""))
        self.job = job


class JobFailed(JobNotSucceeded):
    """The job ended FAILED (``job.error`` says why)."""


class JobCancelled(JobNotSucceeded):
    """The job ended CANCELLED."""


class WaitTimeout(TimeoutError, ClientError):
    """``wait`` ran out of time; ``job`` is the last state seen (still queued or running)."""

    def __init__(self, message: str, job: JobOut | None = None):
        super().__init__(message)
        self.job = job


# --- what the sync and async clients share: no I/O here -----------------------------------------

def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_for(r: httpx.Response) -> ApiError:
    """The typed error of an error answer (its JSON ``detail``, or the text)."""
    try:
        body = r.json()
        detail = body.get("detail", r.text) if isinstance(body, dict) else r.text
    except ValueError:
        detail = r.text
    if r.status_code == 404:
        return NotFound(r.status_code, detail)
    if r.status_code == 409:
        return Conflict(r.status_code, detail)
    if r.status_code == 429:
        return RateLimited(r.status_code, detail, _retry_after(r.headers.get("Retry-After")))
    return ApiError(r.status_code, detail)


class _Retries:
    """How long to sleep before the next try of one request, or None to stop trying."""

    def __init__(self, retries: int, backoff_s: float):
        self.left, self.delay = retries, backoff_s

    def _next(self) -> float | None:
        if self.left <= 0:
            return None
        self.left -= 1
        wait = self.delay * (0.5 + random.random())  # jitter: many pipelines must not retry in lockstep
        self.delay = min(self.delay * 2, 10.0)
        return wait

    def after_response(self, r: httpx.Response) -> float | None:
        if r.status_code not in RETRY_STATUSES:
            return None
        if r.status_code == 429:
            wait = _retry_after(r.headers.get("Retry-After"))
            if wait is not None:
                if wait > MAX_RETRY_AFTER_S or self.left <= 0:
                    return None
                self.left -= 1
                return wait
        return self._next()

    def after_transport_error(self) -> float | None:
        return self._next()


@dataclass(frozen=True)
class _Call(Generic[_T]):
    """One API call: the request to send, and how the answer's JSON becomes what the method returns."""

    method: str
    path: str
    parse: Callable[[Any], _T]
    kw: dict[str, Any] = field(default_factory=dict)  # httpx.request's json / params / headers


def _items(model: Callable[[Any], _T]) -> Callable[[Any], list[_T]]:
    return lambda body: [model(item) for item in body["items"]]


# Each API call is defined once here; Client and AsyncClient only send them (``_call``).
def _submit_call(spec: Any, idempotency_key: str | None, webhook_url: str | None) -> _Call[Submitted]:
    body = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else dict(spec)
    if webhook_url:
        body["webhook_url"] = webhook_url
    headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    return _Call("POST", "/v1/jobs", Submitted.model_validate, {"json": body, "headers": headers})


def _get_call(job_id: str) -> _Call[JobOut]:
    return _Call("GET", f"/v1/jobs/{job_id}", JobOut.model_validate)


def _list_call(params: dict[str, Any]) -> _Call[JobList]:
    return _Call("GET", "/v1/jobs", JobList.model_validate, {"params": params})


def _generations_call(job_id: str) -> _Call[list[GenerationOut]]:
    return _Call("GET", f"/v1/jobs/{job_id}/generations", _items(GenerationOut.model_validate))


def _cancel_call(job_id: str) -> _Call[JobOut]:
    return _Call("POST", f"/v1/jobs/{job_id}/cancel", JobOut.model_validate)


def _artifacts_call(job_id: str) -> _Call[list[ArtifactOut]]:
    return _Call("GET", f"/v1/jobs/{job_id}/artifacts", _items(ArtifactOut.model_validate))


def list_params(status: str | None, limit: int, offset: int, name: str | None,
                labels: Mapping[str, str | None] | Iterable[str] | None, search: str | None,
                sort: str | None) -> dict[str, Any]:
    """Query of GET /v1/jobs. ``labels``: {key: value or None (has the key)} or "key=value" strings."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status:
        params["status"] = status
    if name is not None:
        params["name"] = name
    if labels:
        items = labels.items() if isinstance(labels, Mapping) else (s.partition("=")[::2] for s in labels)
        params["label"] = [k if v is None or v == "" else f"{k}={v}" for k, v in items]
    if search:
        params["q"] = search
    if sort:
        params["sort"] = sort
    return params


def _finished(job: JobOut, raise_on_failure: bool) -> JobOut:
    if raise_on_failure and job.status == "FAILED":
        raise JobFailed(job)
    if raise_on_failure and job.status == "CANCELLED":
        raise JobCancelled(job)
    return job


def _next_poll(job: JobOut, last_progress: float | None, delay: float, poll_s: float, max_poll_s: float) -> float:
    # Poll fast while things move, back off while they don't.
    return poll_s if job.progress != last_progress else min(delay * 1.5, max_poll_s)


def _target(dest: Path, art: ArtifactOut) -> Path:
    target = (dest / art.name).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise ClientError(f"refusing artifact name {art.name!r} (outside {dest})")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _keep_if_intact(tmp: Path, target: Path, art: ArtifactOut, digest: str) -> None:
    if digest != art.sha256:
        tmp.unlink(missing_ok=True)
        raise ChecksumMismatch(art.name, art.sha256, digest)
    tmp.replace(target)


def _http_options(server: str, key: str, timeout: float, transport: Any) -> dict[str, Any]:
    """The httpx client's settings, the same for httpx.Client and httpx.AsyncClient."""
    headers = {"Authorization": f"Bearer {key}", "User-Agent": "evosparse-client/2"}
    return {"base_url": server.rstrip("/"), "timeout": timeout, "transport": transport, "headers": headers}


def _env_credentials() -> tuple[str, str]:
    """Server and key of ``from_env``; ValueError without a key."""
    settings = ClientSettings.from_env()
    if not settings.api_key:
        raise ValueError("EVOSPARSE_API_KEY is not set")
    return settings.server, settings.api_key


# --- the clients ----------------------------------------------------------------------------------

class Client:
    """Blocking client; use as a context manager (or call ``close``)."""

    def __init__(self, server: str, key: str, timeout: float = 30.0, retries: int = 6,
                 backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None):
        self.http = httpx.Client(**_http_options(server, key, timeout, transport))
        self.retries, self.backoff_s = retries, backoff_s

    @classmethod
    def from_env(cls, **kw: Any) -> Client:
        """A client of $EVOSPARSE_SERVER (default http://127.0.0.1:8000) with the key $EVOSPARSE_API_KEY."""
        return cls(*_env_credentials(), **kw)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        retries = _Retries(self.retries, self.backoff_s)
        while True:
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError:
                wait = retries.after_transport_error()
                if wait is None:
                    raise
            else:
                wait = retries.after_response(r)
                if wait is None:
                    if r.status_code >= 400:
                        raise error_for(r)
                    return r
            time.sleep(wait)

    def _call(self, call: _Call[_T]) -> _T:
        return call.parse(self._request(call.method, call.path, **call.kw).json())

    def submit(self, spec: Any, idempotency_key: str | None = None, webhook_url: str | None = None) -> Submitted:
        """Submit a JobSpec (or its dict form); a resubmission with the same key returns the same job."""
        return self._call(_submit_call(spec, idempotency_key, webhook_url))

    def get(self, job_id: str) -> JobOut:
        return self._call(_get_call(job_id))

    def list(self, status: str | None = None, limit: int = 50, offset: int = 0, *, name: str | None = None,
             labels: Mapping[str, str | None] | Iterable[str] | None = None, search: str | None = None,
             sort: str | None = None) -> JobList:
        return self._call(_list_call(list_params(status, limit, offset, name, labels, search, sort)))

    def generations(self, job_id: str) -> list[GenerationOut]:
        return self._call(_generations_call(job_id))

    def cancel(self, job_id: str) -> JobOut:
        return self._call(_cancel_call(job_id))

    def artifacts(self, job_id: str) -> list[ArtifactOut]:
        return self._call(_artifacts_call(job_id))

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.5, max_poll_s: float = 10.0,
             on_update: Callable[[JobOut], None] | None = None, raise_on_failure: bool = True) -> JobOut:
        """Poll until the job ends. Returns it when it SUCCEEDED; a FAILED or CANCELLED job raises
        JobFailed / JobCancelled (or is returned with ``raise_on_failure=False``); WaitTimeout after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, last_progress = poll_s, None
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job.status in TERMINAL:
                return _finished(job, raise_on_failure)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} still {job.status} after {timeout} s", job)
            delay = _next_poll(job, last_progress, delay, poll_s, max_poll_s)
            last_progress = job.progress
            time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))

    def download(self, job_id: str, dest: str | Path) -> Path:
        """Download every artifact of a finished job into ``dest``, checking each SHA-256."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for art in self.artifacts(job_id):
            target = _target(dest, art)
            tmp = target.with_name(target.name + ".part")
            h = hashlib.sha256()
            with self.http.stream("GET", art.url) as r:
                if r.status_code >= 400:
                    r.read()
                    raise error_for(r)
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
            _keep_if_intact(tmp, target, art, h.hexdigest())
        return dest


class AsyncClient:
    """The same client for asyncio: every method is a coroutine (use ``async with``)."""

    def __init__(self, server: str, key: str, timeout: float = 30.0, retries: int = 6,
                 backoff_s: float = 0.5, transport: httpx.AsyncBaseTransport | None = None):
        self.http = httpx.AsyncClient(**_http_options(server, key, timeout, transport))
        self.retries, self.backoff_s = retries, backoff_s

    @classmethod
    def from_env(cls, **kw: Any) -> AsyncClient:
        return cls(*_env_credentials(), **kw)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        retries = _Retries(self.retries, self.backoff_s)
        while True:
            try:
                r = await self.http.request(method, path, **kw)
            except httpx.TransportError:
                wait = retries.after_transport_error()
                if wait is None:
                    raise
            else:
                wait = retries.after_response(r)
                if wait is None:
                    if r.status_code >= 400:
                        raise error_for(r)
                    return r
            await asyncio.sleep(wait)

    async def _call(self, call: _Call[_T]) -> _T:
        return call.parse((await self._request(call.method, call.path, **call.kw)).json())

    async def submit(self, spec: Any, idempotency_key: str | None = None,
                     webhook_url: str | None = None) -> Submitted:
        return await self._call(_submit_call(spec, idempotency_key, webhook_url))

    async def get(self, job_id: str) -> JobOut:
        return await self._call(_get_call(job_id))

    async def list(self, status: str | None = None, limit: int = 50, offset: int = 0, *, name: str | None = None,
                   labels: Mapping[str, str | None] | Iterable[str] | None = None, search: str | None = None,
                   sort: str | None = None) -> JobList:
        return await self._call(_list_call(list_params(status, limit, offset, name, labels, search, sort)))

    async def generations(self, job_id: str) -> list[GenerationOut]:
        return await self._call(_generations_call(job_id))

    async def cancel(self, job_id: str) -> JobOut:
        return await self._call(_cancel_call(job_id))

    async def artifacts(self, job_id: str) -> list[ArtifactOut]:
        return await self._call(_artifacts_call(job_id))

    async def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.5, max_poll_s: float = 10.0,
                   on_update: Callable[[JobOut], Awaitable[None] | None] | None = None,
                   raise_on_failure: bool = True) -> JobOut:
        """As Client.wait; ``on_update`` may be a plain function or a coroutine function."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, last_progress = poll_s, None
        while True:
            job = await self.get(job_id)
            if on_update:
                maybe = on_update(job)
                if asyncio.iscoroutine(maybe):
                    await maybe
            if job.status in TERMINAL:
                return _finished(job, raise_on_failure)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} still {job.status} after {timeout} s", job)
            delay = _next_poll(job, last_progress, delay, poll_s, max_poll_s)
            last_progress = job.progress
            await asyncio.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))

    async def download(self, job_id: str, dest: str | Path) -> Path:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for art in await self.artifacts(job_id):
            target = _target(dest, art)
            tmp = target.with_name(target.name + ".part")
            h = hashlib.sha256()
            async with self.http.stream("GET", art.url) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise error_for(r)
                with open(tmp, "wb") as f:
                    async for chunk in r.aiter_bytes(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
            _keep_if_intact(tmp, target, art, h.hexdigest())
        return dest
