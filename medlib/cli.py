"""`medlib` command line. Each command lives in its own module, which registers its sub-parser.

Command modules keep heavy imports (torch, transformers, unsloth) inside functions, so
`medlib --help` and `medlib data ...` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = {
    "data": "medlib.data.cli",
    "train": "medlib.train",
    "eval": "medlib.evaluate.cli",
    "chat": "medlib.chat.cli",
    "serve": "medlib.chat.serve",
    "export": "medlib.export",
    "study": "medlib.study",
    "reproduce": "medlib.reproduce",
}


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def add_common_args(parser: argparse.ArgumentParser, profile_default: str | None = "local") -> None:
    """--profile / --set / --data-dir / --out, shared by every command that reads a recipe."""
    parser.add_argument("--profile", choices=["local", "paper"], default=profile_default,
                        help="recipe profile (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any recipe key, e.g. --set training.max_steps=20 (repeatable)")
    parser.add_argument("--data-dir", default=None, help="folder of the published data files (overrides the recipe)")
    parser.add_argument("--out", default=None, help="output folder (overrides the recipe)")


def user_errors() -> tuple[type[BaseException], ...]:
    from medlib.config import RecipeError
    from medlib.models import ModelNotFoundError

    from medlib.export import ExportError

    errors: list[type[BaseException]] = [CLIError, RecipeError, ModelNotFoundError, FileNotFoundError, ExportError]
    try:
        from medlib.data.validate import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlib", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        print(f"medlib {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
