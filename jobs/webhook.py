"""Completion webhooks: signed JSON POSTs with a delivery id, sent to a checked and pinned address.

Each delivery carries these headers:

- ``X-Evosparse-Event: job.finished``
- ``X-Evosparse-Delivery: <id>``: the same id on every retry of this delivery (receivers dedupe on it);
- ``X-Evosparse-Timestamp: <unix seconds>`` of this attempt;
- ``X-Evosparse-Signature: v1=<hex HMAC-SHA256(team secret, "<timestamp>.<delivery id>." + body)>``.

The key is the team's own webhook secret (shown once, with the team's first API key), so a
signature made for one team never verifies for another; the timestamp and delivery id are inside
the signed data, so a receiver that refuses old timestamps and seen delivery ids cannot be fed a
replay. ``verify`` does all three checks. The body also names the delivery id and the team.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

import httpx
from evosparse.jobs.netguard import Target, UrlRefused, check_url

log = logging.getLogger("evosparse.webhook")
SIGNATURE_VERSION = "v1"


def encode(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, timestamp: str, delivery_id: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.{delivery_id}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify(secret: str, timestamp: str, delivery_id: str, body: bytes, signature: str,
           tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """What a receiver runs: right key, untouched body and delivery id, and a fresh timestamp."""
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs(age) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, delivery_id, body), signature)


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    retry: bool       # worth trying again later
    detail: str       # for the operator's log and the outbox row, never shown to the user


def send(url: str, body: bytes, secret: str, delivery_id: str, timeout_s: float,
         allow_hosts: list[str], allow_networks: list[str]) -> Attempt:
    """One delivery attempt: re-check the URL now, connect to the checked address, no redirects."""
    try:
        target: Target = check_url(url, allow_hosts, allow_networks)
    except UrlRefused as exc:
        return Attempt(False, False, f"refused: {exc}")
    ts = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Evosparse-Event": "job.finished",
               "X-Evosparse-Delivery": delivery_id, "X-Evosparse-Timestamp": ts,
               "X-Evosparse-Signature": sign(secret, ts, delivery_id, body),
               "User-Agent": "evosparse-webhook/2", "Host": target.host_header()}
    # TLS: the certificate is checked against the name, while the socket goes to the pinned address.
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            r = client.post(target.pinned_url(), content=body, headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        return Attempt(False, True, f"{type(exc).__name__}")
    if r.status_code < 300:
        return Attempt(True, False, f"HTTP {r.status_code}")
    # 3xx is not followed (a redirect could lead anywhere); 4xx other than 408/429 will not improve.
    retry = r.status_code >= 500 or r.status_code in (408, 429)
    return Attempt(False, retry, f"HTTP {r.status_code}")


__all__ = ["Attempt", "UrlRefused", "encode", "send", "sign", "verify"]
