"""`medlib handoff measure`: how much of stage 1 a published merged model keeps after its reload in 4-bit.

    medlib handoff measure --base unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit --merged Dasun7/Med-mix-Llama-3.1-8B
    medlib handoff measure --base DIR --merged DIR --json handoff.json

ΔW1 = the merged 16-bit weights - the pre-quantised base de-quantised exactly (W'), per adapted matrix;
then NF4(merged) - W' is what the authors' stage 2 and evaluation actually had of it. No GPU: per-matrix
arithmetic, streamed shard by shard (Hub repositories are downloaded one shard at a time, as read).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medlib.cli_common import CLIError
from medlib.training.handoff import measure_published


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("handoff", help="measure what a stage-1 -> stage-2 handoff keeps",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="handoff_command", required=True)
    measure = sub.add_parser("measure", help="ΔW of a merged 16-bit model against its pre-quantised base, and the "
                                             "share its 4-bit reload keeps")
    measure.add_argument("--base", required=True, help="the pre-quantised (bitsandbytes NF4) base: a folder or Hub id")
    measure.add_argument("--merged", required=True, help="the merged 16-bit model: a folder or Hub id")
    measure.add_argument("--modules", default="", help="comma-separated module names to keep (default: every 4-bit matrix)")
    measure.add_argument("--json", default=None, help="also write the report to this file")
    measure.set_defaults(func=main)


def summary_lines(report: dict) -> list[str]:
    rows = [("all", report["all"]), *report["by_module"].items()]
    lines = [f"{report['merged']} against {report['base']} ({report['quantization']}; merged weights in "
             f"{report['merge_dtype']})", "",
             "| matrices | n | |ΔW| / |W'| | kept by the 4-bit reload (projection) | cosine |",
             "|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['matrices']} | {100 * r['delta_over_weight']:.3f}% | "
                     f"{100 * r['kept_share']:.1f}% | {r['kept_cosine']:.3f} |")
    return lines


def main(args: argparse.Namespace) -> int:
    modules = tuple(m.strip() for m in args.modules.split(",") if m.strip())
    try:
        report = measure_published(args.base, args.merged, modules)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print("\n".join(summary_lines(report)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
