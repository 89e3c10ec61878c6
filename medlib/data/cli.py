"""`medlib data build` and `medlib data inspect`."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from medlib import config
from medlib.cli_common import add_common_args
from medlib.data.loaders import load_source
from medlib.data.mixtures import build_mixture, ensure_mixture, summary_lines
from medlib.data.sources import get_source, source_names
from medlib.runs import layout, stage1_of, with_data_dir
from medlib.prompts import record_to_messages


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="build training mixtures, inspect sources")
    sub = parser.add_subparsers(dest="data_command", required=True)
    build = sub.add_parser("build", help="build a stage's mixture and manifest.json (outputs/<profile>/data/<mixture>/)")
    add_common_args(build)
    which = build.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", type=int, choices=[1, 2])
    which.add_argument("--recipe", default=None, metavar="NAME", help="another training recipe, e.g. chatdoctor")
    build.set_defaults(func=cmd_build)
    inspect = sub.add_parser("inspect", help="counts and one formatted prompt of a source")
    inspect.add_argument("source", choices=source_names(), help="a registered source (medlib.data.sources)")
    inspect.add_argument("--split", default=None, help="default: the source's evaluation or training split")
    inspect.add_argument("--data-dir", default=None, help="folder of published files ('samples' for the shipped samples)")
    inspect.add_argument("--hub", action="store_true", help="read from the Hugging Face Hub instead of a folder")
    inspect.set_defaults(func=cmd_inspect)


def cmd_build(args: argparse.Namespace) -> int:
    """Build (or rebuild) the recipe's mixture; a replaying recipe's stage-1 mixture is built first when missing."""
    recipe = with_data_dir(config.load_train(args.profile, args.recipe or args.stage, args.overrides), args.data_dir)
    lay = layout(args.profile)
    stage1_mixture = ensure_mixture(stage1_of(recipe), lay) if recipe.data.replay else None
    out = build_mixture(recipe, args.out or lay.mixture(recipe.mixture), config.load_eval(args.profile), stage1_mixture)
    print("\n".join(summary_lines(out)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    split = args.split or get_source(args.source).default_split
    result = load_source(args.source, split, args.data_dir, strict=False, hub=args.hub)
    print(json.dumps(result.summary(), indent=1))
    if result.records and "options" in result.records[0]:
        print("answers:", dict(sorted(Counter(r["answer"] for r in result.records).items())))
    if result.records:
        print("\n--- first record as the model sees it (system, user, assistant) ---")
        for message in record_to_messages(result.records[0]):
            print(f"[{message['role']}]\n{message['content']}\n")
    return 0
