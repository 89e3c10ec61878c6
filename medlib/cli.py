"""`medlib` command line. Each command lives in its own module, which registers its sub-parser.

Command modules keep heavy imports (torch, transformers, unsloth) inside functions, so
`medlib --help` and `medlib data ...` start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medlib import export, reproduce, study
from medlib.chat import cli as chat_cli
from medlib.chat import serve
from medlib.cli_common import CLIError
from medlib.config import RecipeError
from medlib.data import cli as data_cli
from medlib.data.validate import DataError
from medlib.evaluate import cli as eval_cli
from medlib.models import ModelNotFoundError
from medlib.training import cli as train_cli
from medlib.training import handoff_cli

COMMANDS = (data_cli, train_cli, handoff_cli, eval_cli, chat_cli, serve, export, study, reproduce)
USER_ERRORS = (CLIError, RecipeError, ModelNotFoundError, FileNotFoundError, export.ExportError, DataError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlib", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"medlib {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
