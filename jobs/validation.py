"""Server-side policy checks on a JobSpec: allowed model/data locations and search budget limits.

The pydantic JobSpec already rejects malformed values (sparsity outside (0, 1), bad N:M, unknown
pruner...). These checks depend on the server's configuration, so they live here; the API runs
them before creating a job and the worker runs them again before loading anything (a symlink
may have been swapped in between).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from evosparse.jobs.settings import Settings
from evosparse.jobs.spec import HUB_EVAL_TASKS, JobSpec, parse_mixed, parse_pattern, parse_selection

BUILTIN_MODELS = frozenset({"smollm2-135m"})  # the names of pruning.loading.BUILTIN_MODELS (tests/test_loading.py)
BUILTIN_DATA = frozenset({"pydoc"})
# Input dimensions of the built-in models' prunable linears (SmolLM2-135M: hidden 576, MLP 1536),
# so a group size or N:M group is checked in the request path without loading the model.
BUILTIN_IN_FEATURES = {"smollm2-135m": frozenset({576, 1536})}
BUILTIN_BLOCKS = {"smollm2-135m": 30}
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
    hub_tasks = [t for t in spec.eval_tasks if t in HUB_EVAL_TASKS]
    if hub_tasks and not settings.allow_hub:
        # Their datasets live on the hub: refused now rather than failing after the pruning.
        raise SpecRejected("eval_tasks", f"{', '.join(hub_tasks)} download their data from the Hugging Face hub, "
                                         f"which this server does not allow; pydoc_cloze runs offline")


def model_in_features(model: str) -> frozenset[int] | None:
    """Input dimensions of a model's prunable linears, read from its config.json without loading it.

    Known for the built-in models and local Hugging Face folders; None (unknown, the worker checks
    the real shapes before pruning) for hub ids and GGUF files.
    """
    if model in BUILTIN_IN_FEATURES:
        return BUILTIN_IN_FEATURES[model]
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    inner = cfg.get("intermediate_size") or cfg.get("ffn_dim") or cfg.get("n_inner")
    if not isinstance(hidden, int):
        return None
    if not isinstance(inner, int):
        inner = 4 * hidden  # GPT-2 leaves n_inner empty for 4 × n_embd
    dims = {hidden, inner}
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        dims.add(heads * head_dim)  # the attention output projection's input
    return frozenset(dims)


def model_blocks(model: str) -> int | None:
    """Number of decoder blocks from config.json (None when unknown)."""
    if model in BUILTIN_BLOCKS:
        return BUILTIN_BLOCKS[model]
    config = Path(model) / "config.json"
    try:
        cfg = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    return n if isinstance(n, int) and n > 0 else None


def _dividing(dims: frozenset[int], upto: int = 512) -> str:
    common = [g for g in range(8, upto + 1) if all(d % g == 0 for d in dims)]
    return ", ".join(map(str, common)) or "none from 8 up"


def model_type(model: str) -> str | None:
    """config.json's model_type (None when unknown: hub ids and GGUF files, which the worker checks)."""
    if model in BUILTIN_IN_FEATURES:
        return "llama"  # SmolLM2
    config = Path(model) / "config.json"
    try:
        cfg = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, ValueError):
        return None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    return kind if isinstance(kind, str) else None


def check_shapes(spec: JobSpec) -> None:
    """Quantization groups and N:M groups must tile every linear's input dimension; gguf needs a llama."""
    kind = model_type(spec.model) if spec.format == "gguf" else None
    if kind is not None and kind != "llama":
        raise SpecRejected("format", f"gguf is written for the llama architecture; {spec.model} is {kind!r}")
    dims = model_in_features(spec.model)
    if dims is None:
        return
    if spec.quantize is not None:
        g = spec.quantize.group_size
        bad = sorted(d for d in dims if d % g)
        if bad:
            raise SpecRejected("quantize.group_size", f"{g} does not divide the input dimension {bad[0]} of "
                                                      f"{spec.model}'s linears (sizes that do: {_dividing(dims)})")
    mixed = parse_mixed(spec.pattern)
    m = mixed.m if mixed is not None else (parse_pattern(spec.pattern) or (0, 0))[1]
    if m:
        bad = sorted(d for d in dims if d % m)
        if bad:
            raise SpecRejected("pattern", f"{spec.pattern} needs input dimensions divisible by {m}, "
                                          f"but {spec.model} has {bad[0]}")
    blocks = model_blocks(spec.model)
    if mixed is not None and blocks is not None:
        # Equal blocks each pruning p of every M (p a multiple of the choices' spacing): the target
        # must be a whole number of such steps over all blocks.
        dp = mixed.pruned[1] - mixed.pruned[0]
        steps = spec.sparsity * mixed.m * blocks / dp
        if abs(steps - round(steps)) > 1e-6:
            lo, hi = math.floor(steps) * dp / (mixed.m * blocks), math.ceil(steps) * dp / (mixed.m * blocks)
            raise SpecRejected("sparsity", f"{spec.sparsity:g} is not reachable exactly with {spec.pattern} over "
                                           f"{blocks} layers (nearest: {lo:.6g}, {hi:.6g})")


def check_spec(spec: JobSpec, settings: Settings) -> JobSpec:
    """Apply the server policy; returns the spec with local paths replaced by their real paths."""
    check_limits(spec, settings)
    updates = {
        "model": check_source("model", spec.model, settings, "model"),
        "calib": check_source("calib", spec.calib, settings, "data"),
        "eval": check_source("eval", spec.eval, settings, "data"),
    }
    checked = spec.model_copy(update=updates)
    check_shapes(checked)
    return checked
