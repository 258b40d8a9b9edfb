"""`evosparse serve`, `submit`, `keys`: talk to / start the service (owned by the service)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Placeholder until the service lands: registers nothing yet."""
