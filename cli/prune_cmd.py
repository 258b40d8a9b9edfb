"""`evosparse prune` and `evosparse eval`: run one job in-process (owned by the pruning core)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Placeholder until the pruning core lands: registers nothing yet."""
