"""Server-side policy checks on a JobSpec: allowed model/data locations and search budget limits.

The pydantic JobSpec already rejects malformed values (sparsity outside (0, 1), bad N:M, unknown
pruner...). These checks depend on the server's configuration, so they live here; the API runs
them before creating a job and the worker runs them again before loading anything (a symlink
may have been swapped in between).
"""

from __future__ import annotations

import re
from pathlib import Path

from evosparse.jobs.settings import Settings
from evosparse.jobs.spec import JobSpec, parse_selection

BUILTIN_MODELS = frozenset({"smollm2-135m"})  # the names of pruning.loading.BUILTIN_MODELS (tests/test_loading.py)
BUILTIN_DATA = frozenset({"pydoc"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


class SpecRejected(ValueError):
    """The spec is well-formed but this server will not run it; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _looks_like_path(value: str) -> bool:
    return (value.startswith(("/", "~", ".")) or "\\" in value or ".." in value.split("/")
            or value.endswith((".gguf", ".txt", ".md")))


def _inside(path: Path, roots: list[Path]) -> bool:
    for root in roots:
        r = root.expanduser().resolve()
        if path == r or path.is_relative_to(r):
            return True
    return False


def resolve_local(field: str, value: str, roots: list[Path], what: str) -> str:
    """Resolve symlinks and '..' first, then require the real path to sit under an allowed root."""
    if "\x00" in value:
        raise SpecRejected(field, "contains a NUL byte")
    raw = Path(value).expanduser()
    if not raw.is_absolute():
        raise SpecRejected(field, f"local {what} paths must be absolute, got {value!r}")
    if not roots:
        raise SpecRejected(field, f"this server accepts no local {what} paths (no allowed roots configured)")
    real = raw.resolve()
    # The message never lists the allowed folders: they describe the server's file system.
    if not _inside(real, roots):
        raise SpecRejected(field, f"{value!r} is outside the allowed {what} folders")
    if not real.exists():
        raise SpecRejected(field, f"{what} path {value!r} does not exist")
    if what == "model":
        is_root = any(real == r.expanduser().resolve() for r in roots)
        hf_dir = real.is_dir() and (real / "config.json").is_file()
        gguf = real.is_file() and real.suffix.lower() == ".gguf"
        if is_root or not (hf_dir or gguf):
            raise SpecRejected(field, f"{value!r} is not a model: give a folder holding config.json "
                                      f"(a Hugging Face checkpoint) or a .gguf file")
    return str(real)


def check_source(field: str, value: str, settings: Settings, kind: str) -> str:
    """Return the value to store (local paths become their resolved real path)."""
    builtin = BUILTIN_MODELS if kind == "model" else BUILTIN_DATA
    roots = settings.allowed_model_roots if kind == "model" else settings.allowed_data_roots
    if value in builtin:
        return value
    if _looks_like_path(value):
        return resolve_local(field, value, roots, kind)
    if not _HUB_ID.match(value) or ".." in value:
        raise SpecRejected(field, f"{value!r} is neither a built-in name, an absolute path nor a hub name")
    if not settings.allow_hub:
        names = ", ".join(sorted(builtin))
        raise SpecRejected(field, f"hub names are disabled on this server; use {names} or an absolute path "
                                  f"under the allowed folders")
    return value


def check_limits(spec: JobSpec, settings: Settings) -> None:
    s = spec.search
    if s.generations > settings.max_generations:
        raise SpecRejected("search.generations", f"{s.generations} is above this server's limit "
                                                 f"{settings.max_generations}")
    if s.offspring > settings.max_offspring:
        raise SpecRejected("search.offspring", f"{s.offspring} is above this server's limit {settings.max_offspring}")
    top_tokens = max(t for t, _ in parse_selection(s.selection))
    if top_tokens > settings.max_search_tokens:
        raise SpecRejected("search.selection", f"{top_tokens} tokens is above this server's limit "
                                               f"{settings.max_search_tokens}")
    if s.workers > settings.max_search_workers:
        raise SpecRejected("search.workers", f"{s.workers} is above this server's limit {settings.max_search_workers}")
    budget_cap = min(settings.max_time_budget_min, settings.task_time_limit_s / 60.0)
    if s.time_budget_min is not None and s.time_budget_min > budget_cap:
        # Above the task time limit the job would be killed before its search budget ran out.
        raise SpecRejected("search.time_budget_min", f"{s.time_budget_min} is above this server's limit "
                                                     f"{budget_cap:g} (minutes)")
    for name in ("calib_windows", "eval_windows"):
        if getattr(spec, name) > settings.max_windows:
            raise SpecRejected(name, f"{getattr(spec, name)} is above this server's limit {settings.max_windows}")
    if spec.seq_len > settings.max_seq_len:
        raise SpecRejected("seq_len", f"{spec.seq_len} is above this server's limit {settings.max_seq_len}")


def check_spec(spec: JobSpec, settings: Settings) -> JobSpec:
    """Apply the server policy; returns the spec with local paths replaced by their real paths."""
    check_limits(spec, settings)
    updates = {
        "model": check_source("model", spec.model, settings, "model"),
        "calib": check_source("calib", spec.calib, settings, "data"),
        "eval": check_source("eval", spec.eval, settings, "data"),
    }
    return spec.model_copy(update=updates)
