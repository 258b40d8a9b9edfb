"""The Hugging Face hub as seen from this machine: is it reachable at all?

Offline machines must fail in seconds with a clear message, not after transformers' or datasets'
network retries (tens of seconds), so both model and data loading ask this first.
"""

from __future__ import annotations

import socket

from evosparse.pruning.config import offline_requested


def unreachable(host: str, port: int = 443, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to host:port opens within ``timeout``, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def hub_offline(timeout: float = 3.0) -> bool:
    """True when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or huggingface.co:443 does not answer."""
    return offline_requested() or unreachable("huggingface.co", 443, timeout) is not None
