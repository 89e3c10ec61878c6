"""`medlib chat`: terminal REPL over ChatSession. Reads stdin line by line when piped."""

from __future__ import annotations

import argparse
import sys

from medlib.chat.session import ChatSession

PROMPT = "you> "
ASSISTANT = "assistant> "


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat", help="medical chatbot in the terminal (reads stdin when piped)",
        description="Routed medical chatbot on the profile's base model + Med-Nirvana adapter. "
                    "Type /reset to clear the history, /quit (or Ctrl-D) to leave.")
    parser.add_argument("--profile", choices=["local", "paper"], default="local",
                        help="recipe profile (default: %(default)s)")
    parser.add_argument("--adapter", default=None,
                        help="adapter folder (default: the recipe's, i.e. outputs/<profile>/med-nirvana)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a chat recipe key, e.g. --set generation.temperature=0.7 (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    interactive = sys.stdin.isatty()
    session = ChatSession.from_profile(args.profile, adapter=args.adapter, overrides=args.overrides)
    out = sys.stdout
    print(f"[medlib chat] {session.describe()}", file=out)
    for notice in session.startup_notices:
        print(f"[medlib chat] {notice}", file=out)
    if interactive:
        print("[medlib chat] Ask a health question. /reset clears the history, /quit leaves.", file=out)
    out.flush()

    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()

    while True:
        if interactive:
            try:
                line = input(PROMPT)
            except EOFError:
                print(file=out)
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            shown = line if len(line) <= 200 else line[:200] + f"... ({len(line):,} characters)"
            print(f"{PROMPT}{shown}", file=out)
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            session.reset()
            print(f"{ASSISTANT}History cleared.", file=out)
            continue
        out.write(ASSISTANT)
        session.reply(line, stream=stream)
        out.write("\n\n" if not interactive else "\n")
        out.flush()
    return 0
