"""The Hugging Face hub as seen from this machine: is it reachable at all?

Offline machines must fail in seconds with a clear message, not after transformers' or datasets'
network retries (tens of seconds), so both model and data loading ask this first.
"""

from __future__ import annotations

import socket

from evosparse.pruning.config import offline_requested


def hub_offline(timeout: float = 3.0) -> bool:
    """True when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or huggingface.co:443 does not answer."""
    if offline_requested():
        return True
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return False
    except OSError:
        return True
