"""Bearer API keys -> team id. Keys are looked up by SHA-256; lookups are cached briefly per process."""

from __future__ import annotations

import threading
import time

from evosparse.api.deps import db_session
from evosparse.jobs.repo import hash_token, team_for_token
from fastapi import HTTPException, Request

_cache: dict[str, tuple[int, float]] = {}
_lock = threading.Lock()


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


async def current_team(request: Request) -> int:
    # async: a cache hit costs no threadpool hop; a miss is one indexed lookup (sub-millisecond).
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>' (create one with "
                            "`evosparse keys create --team NAME`)")
    ttl = request.app.state.settings.auth_cache_s
    digest = hash_token(token)
    now = time.monotonic()
    with _lock:
        hit = _cache.get(digest)
    if hit is not None and hit[1] > now:
        return hit[0]
    with db_session(request) as db:
        team_id = team_for_token(db, token)
    if team_id is None:
        raise _unauthorized("invalid or revoked API key")
    if ttl > 0:
        with _lock:
            if len(_cache) > 10_000:
                _cache.clear()
            _cache[digest] = (team_id, now + ttl)
    return team_id
