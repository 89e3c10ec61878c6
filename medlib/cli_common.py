"""What every command module of the `medlib` CLI shares; a leaf module (imports nothing of medlib's)."""

from __future__ import annotations

import argparse


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def add_common_args(parser: argparse.ArgumentParser, profile_default: str | None = "local") -> None:
    """--profile / --set / --data-dir / --out, shared by every command that reads a recipe."""
    parser.add_argument("--profile", choices=["local", "paper"], default=profile_default,
                        help="recipe profile (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any recipe key, e.g. --set training.max_steps=20 (repeatable)")
    parser.add_argument("--data-dir", default=None, help="folder of the published data files (overrides the recipe)")
    parser.add_argument("--out", default=None, help="output folder (default: under outputs/<profile>/)")
