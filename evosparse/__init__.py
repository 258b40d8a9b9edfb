"""evosparse: prune large language models by searching how sparse each layer should be.

The public Python surface:

- ``Client`` / ``AsyncClient``: the REST client of an evosparse server (submit, wait, download),
  answering with typed models and raising ``NotFound``, ``Conflict``, ``JobFailed``, ... (all
  ``ClientError``); needs only the base install (``pip install evosparse``).
- ``prune(spec, out_dir)``: run one pruning job in this process and return its report; needs the
  ``[worker]`` extra (torch, transformers).
- ``JobSpec``: the job specification both take.

The subpackages (``evosparse.api``, ``evosparse.worker``, ``evosparse.pruning``,
``evosparse.search``, ``evosparse.jobs``, ``evosparse.cli``) live in the repository's top-level
folders of the same names.
"""

from __future__ import annotations

from importlib import import_module, metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evosparse.jobs.client import (
        ApiError,
        AsyncClient,
        ChecksumMismatch,
        Client,
        ClientError,
        Conflict,
        JobCancelled,
        JobFailed,
        NotFound,
        RateLimited,
        WaitTimeout,
    )
    from evosparse.jobs.spec import JobSpec
    from evosparse.worker.hooks import RunHooks

# Imported on first use, so `import evosparse.search` (torch-free, dependency-free) stays light.
_CLIENT_NAMES = ("ApiError", "AsyncClient", "ChecksumMismatch", "Client", "ClientError", "Conflict", "JobCancelled",
                 "JobFailed", "NotFound", "RateLimited", "WaitTimeout")
_LAZY = {**dict.fromkeys(_CLIENT_NAMES, "evosparse.jobs.client"), "JobSpec": "evosparse.jobs.spec"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evosparse' has no attribute {name!r}")

try:
    __version__ = metadata.version("evosparse")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["ApiError", "AsyncClient", "ChecksumMismatch", "Client", "ClientError", "Conflict", "JobCancelled",
           "JobFailed", "JobSpec", "NotFound", "RateLimited", "WaitTimeout", "__version__", "prune"]


def prune(
    spec: JobSpec | dict[str, Any],
    out_dir: str | Path,
    hooks: RunHooks | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run one pruning job in this process; returns report.json's content (also written to ``out_dir``).

    ``spec`` is a JobSpec or its dict form (the same JSON the REST API takes). The output folder
    appears only when the job completed; on any error nothing is left behind.
    """
    from evosparse.jobs.spec import JobSpec
    from evosparse.worker.runner import run_job  # torch: imported only when a job runs

    job = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
    return run_job(job, out_dir, hooks=hooks, overwrite=overwrite)
