"""Completion webhooks: a JSON POST signed with HMAC-SHA256, retried with exponential backoff.

Headers: ``X-Evosparse-Event: job.finished``, ``X-Evosparse-Timestamp: <unix seconds>`` and
``X-Evosparse-Signature: sha256=<hex HMAC of "<timestamp>.<body>">`` (keyed with the server's
webhook secret). Receivers recompute the HMAC over the raw body and reject stale timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

import httpx

log = logging.getLogger("evosparse.webhook")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def deliver(url: str, payload: dict, secret: str | None, attempts: int = 5, backoff_s: float = 1.0,
            timeout_s: float = 5.0) -> str:
    """POST ``payload``; retry on network errors and 5xx/429. Returns a short status for the job row."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    last = "not attempted"
    for attempt in range(1, attempts + 1):
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Evosparse-Event": "job.finished",
                   "X-Evosparse-Timestamp": ts, "User-Agent": "evosparse-webhook/1"}
        if secret:
            headers["X-Evosparse-Signature"] = sign(secret, ts, body)
        try:
            r = httpx.post(url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False)
            if r.status_code < 300:
                return f"delivered ({r.status_code}, attempt {attempt})"
            last = f"HTTP {r.status_code}"
            if r.status_code < 500 and r.status_code != 429:
                return f"rejected by receiver: {last}"  # a 4xx will not get better by retrying
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        log.warning("webhook %s attempt %d failed: %s", url, attempt, last)
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return f"failed after {attempts} attempts: {last}"[:200]
