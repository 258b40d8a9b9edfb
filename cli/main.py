"""The ``evosparse`` command: one dispatcher, one module per group of subcommands.

Every failure the user can act on (EvosparseError, bad arguments) prints one line and exits
non-zero; a traceback appears only with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys

from evosparse.cli import prune_cmd, service_cmd
from evosparse.pruning.errors import EvosparseError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evosparse", description="Prune LLMs by searching per-layer sparsity.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    prune_cmd.register(sub)  # prune, eval
    service_cmd.register(sub)  # serve, submit, keys
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("evosparse: interrupted", file=sys.stderr)
        return 130
    except (EvosparseError, ValueError, FileNotFoundError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"evosparse: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
