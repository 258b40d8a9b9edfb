"""Bearer API keys -> team id, and the per-team request rate limit.

Every request checks its key in the database (one indexed lookup, in the threadpool, never on the
event loop), so a revoked or expired key is refused by every API process at once.
"""

from __future__ import annotations

from evosparse.api.deps import db_session
from evosparse.api.limits import RateLimiter, retry_after_header
from evosparse.jobs.repo import team_for_token
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# Declares the Bearer scheme in /openapi.json (so /docs has an "Authorize" button and sends the key);
# auto_error=False because the checks below answer with their own messages.
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                           description="an API key from `evosparse keys create --team NAME`")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def _limiter(request: Request) -> RateLimiter:
    state = request.app.state
    if getattr(state, "rate_limiter", None) is None:
        s = state.settings
        state.rate_limiter = RateLimiter(s.rate_limit_per_s, s.rate_limit_burst)
    return state.rate_limiter


def current_team(request: Request,
                 _declared: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> int:
    # A sync dependency: FastAPI runs it in the threadpool, so the database lookup never blocks the loop.
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>' (create one with "
                            "`evosparse keys create --team NAME`)")
    if len(token) > 200 or not token.isascii():
        raise _unauthorized("invalid, expired or revoked API key")
    with db_session(request) as db:
        team_id = team_for_token(db, token)
    if team_id is None:
        raise _unauthorized("invalid, expired or revoked API key")
    wait = _limiter(request).acquire(team_id)
    if wait > 0:
        raise HTTPException(status_code=429, detail="too many requests for this team; slow down",
                            headers=retry_after_header(wait))
    return team_id
