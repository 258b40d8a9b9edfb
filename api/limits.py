"""Per-team request rate limit: a token bucket per team in each API process.

A team may make ``rate_limit_burst`` requests at once and ``rate_limit_per_s`` per second after
that; the next request gets 429 with ``Retry-After`` (whole seconds until a token is back). The
bucket lives in the process, so with N API processes a team gets up to N times the rate; that keeps
the check free of any shared round trip (see README, per-team limits).
"""

from __future__ import annotations

import math
import threading
import time


class RateLimiter:
    def __init__(self, per_s: float, burst: int, max_teams: int = 100_000):
        self.per_s, self.burst, self.max_teams = per_s, burst, max_teams
        self._buckets: dict[int, tuple[float, float]] = {}  # team -> (tokens, last refill time)
        self._lock = threading.Lock()

    def acquire(self, team_id: int, now: float | None = None) -> float:
        """Take a token; returns 0 when allowed, else the seconds to wait before retrying."""
        if self.per_s <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(team_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.per_s)
            if tokens >= 1.0:
                if len(self._buckets) >= self.max_teams and team_id not in self._buckets:
                    self._buckets.clear()  # bounded memory; a full bucket for everyone is the safe reset
                self._buckets[team_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[team_id] = (tokens, now)
            return (1.0 - tokens) / self.per_s


def retry_after_header(wait_s: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}
