"""What the job list (GET /v1/jobs, `evosparse list`, the dashboard) sorts and filters by.

Dependency-free, so the client install shares it with the API.
"""

from __future__ import annotations

import re

from evosparse.jobs.spec import check_label

# Columns of the job record a list may be sorted by ('-' in front: descending).
SORT_KEYS: tuple[str, ...] = ("created_at", "finished_at", "name", "status", "best_fitness", "progress")
DEFAULT_SORT = "-created_at"
SORT_PATTERN = "^-?(" + "|".join(SORT_KEYS) + ")$"


def parse_label_filters(raw: list[str] | tuple[str, ...]) -> tuple[tuple[str, str | None], ...]:
    """``key=value`` (jobs with that value) or ``key`` (jobs with the label), checked like a spec's
    labels; ValueError names the first bad one."""
    out = []
    for item in raw:
        key, eq, value = item.partition("=")
        check_label(key, value if eq else None)
        out.append((key, value if eq else None))
    return tuple(out)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SEARCH_MAX = 100


def check_search(text: str) -> str:
    """The free-text search, stripped; ValueError for control characters (PostgreSQL refuses NUL)."""
    if len(text) > SEARCH_MAX or _CONTROL.search(text):
        raise ValueError(f"search must be at most {SEARCH_MAX} printable characters")
    return text.strip()
