"""The pruning library's environment, read here and nowhere else in pruning/.

pruning/ also runs without the service (``evosparse prune``, ``evosparse.prune()``, bench/), so it
cannot take these from jobs/settings.py; the few knobs it has are read in this one place, at call
time (a process that changes its environment, as tests do, sees the change).

- ``EVOSPARSE_CACHE``: folder for models converted on first load (GGUF -> safetensors);
  default ``~/.cache/evosparse``.
- ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``: Hugging Face's own offline switches. When either
  is set, model and data loading use local files only and fail at once instead of retrying the
  network.
"""

from __future__ import annotations

import os
from pathlib import Path

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def cache_dir() -> Path:
    """Where converted models are cached (``EVOSPARSE_CACHE``)."""
    return Path(os.environ.get("EVOSPARSE_CACHE") or Path.home() / ".cache" / "evosparse")


def offline_requested() -> bool:
    """True when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set to anything but '' or '0'."""
    return any(os.environ.get(v, "") not in ("", "0") for v in _OFFLINE_VARIABLES)
