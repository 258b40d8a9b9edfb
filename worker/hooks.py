"""The callbacks a running job reports through: torch-free, so the Celery task module (imported by
webhook-only workers of a [server] install too) can subclass them without importing the runner."""

from __future__ import annotations


class RunHooks:
    """Callbacks of a running job; the defaults do nothing. The service and the CLI subclass it."""

    def stage(self, name: str, fraction: float, message: str = "") -> None:
        """Overall progress 0..1, with the current stage's name and a short message."""

    def generation(self, record: dict, state: bytes) -> None:
        """After each search generation: its record and the serialised search state."""

    def should_cancel(self) -> bool:
        """Checked between blocks and generations; True makes the job raise CancelledError."""
        return False
