"""`medlib eval mcq|bertscore|all|tables`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from medlib import config
from medlib.cli_common import add_common_args
from medlib.config import EvalRecipe
from medlib.data.sources import source_names
from medlib.evaluate.bertscore import run_bertscore
from medlib.evaluate.mcq import run_mcq
from medlib.evaluate.tables import collect_results, write_samples, write_table3, write_table4
from medlib.evaluate.suite import run_all
from medlib.runs import layout, with_data_dir

log = logging.getLogger(__name__)


def recipe_from_args(args: argparse.Namespace) -> EvalRecipe:
    """The eval recipe with --set, then the command's own flags, applied."""
    recipe = with_data_dir(config.load_eval(args.profile, args.overrides), args.data_dir)
    model = recipe.model
    if getattr(args, "model", None):
        model = model.replace(name=args.model)
    if getattr(args, "load_in_4bit", None) is not None:
        model = model.replace(load_in_4bit=args.load_in_4bit)
    if getattr(args, "dtype", None):
        model = model.replace(dtype=args.dtype)
    mcq = recipe.mcq
    if getattr(args, "sets", None):
        mcq = mcq.replace(sets=tuple(s.strip() for s in args.sets.split(",") if s.strip()))
    if getattr(args, "method", None):
        mcq = mcq.replace(method=args.method)
    if getattr(args, "limit", None) is not None:
        mcq = mcq.replace(limit=args.limit or None)
    bs = recipe.bertscore
    if getattr(args, "n", None):
        bs = bs.replace(n_queries=args.n)
    return recipe.replace(model=model, mcq=mcq, bertscore=bs)


def _out_dir(args: argparse.Namespace) -> Path:
    return layout(args.profile, args.out).eval if not args.out else Path(args.out)


def _summary_mcq(results: dict[str, Any]) -> str:
    lines = [f"{results['display_name']} ({results['model']}, adapters: {results['adapters'] or 'none'}, "
             f"{results['settings']['method']}, {'nf4' if results['load_in_4bit'] else results['dtype']})"]
    for name, s in results["sets"].items():
        extra = f", unparseable {s['unparseable_share']:.1%}" if "unparseable_share" in s else ""
        lines.append(f"  {name:10s} {s['accuracy']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] n={s['n_scored']}"
                     f" bad={s['n_bad']} truncated={s['n_truncated']}{extra}")
    if results.get("average"):
        a = results["average"]
        lines.append(f"  {'average':10s} {a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] over {', '.join(a['sets'])}")
    return "\n".join(lines)


def cmd_mcq(args: argparse.Namespace) -> int:
    results = run_mcq(recipe_from_args(args), _out_dir(args), args.adapter, label=args.label)
    print(_summary_mcq(results))
    print("tables:", ", ".join(results.get("table3", [])))
    return 0


def cmd_bertscore(args: argparse.Namespace) -> int:
    results = run_bertscore(recipe_from_args(args), _out_dir(args), args.adapter, label=args.label)
    s = results["scores"]
    print(f"{results['display_name']}: BERTScore P {s['precision']:.4f} R {s['recall']:.4f} F1 {s['f1']:.4f} "
          f"over {results['n']} ({results['decoding']}); hash {results['bertscore']['hash']}")
    print("tables:", ", ".join(results.get("table4", [])), results.get("samples", ""))
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    out = run_all(recipe_from_args(args), _out_dir(args), layout(args.profile, args.runs_root).root)
    for results in out["mcq"].values():
        print(_summary_mcq(results))
    for results in out["bertscore"].values():
        print(f"{results['display_name']}: BERTScore F1 {results['scores']['f1']:.4f}")
    for label, why in out["skipped"].items():
        print(f"skipped {label}: {why}")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    recipe = config.load_eval(args.profile, args.overrides)
    out_dir = _out_dir(args)
    written = [*write_table3(out_dir=out_dir, reference_file=args.reference)]
    if collect_results(out_dir, "bertscore"):
        written += [*write_table4(out_dir=out_dir, reference_file=args.reference),
                    write_samples(out_dir=out_dir, k=recipe.bertscore.samples_k)]
    print("\n".join(str(p) for p in written))
    return 0


def _model_args(parser: argparse.ArgumentParser, adapter: bool = True) -> None:
    add_common_args(parser)
    parser.add_argument("--model", default=None, help="base model (Hub id, folder, pypi:...); default: the profile's eval recipe")
    if adapter:
        parser.add_argument("--adapter", default=None, help="adapter folder (a training run dir with adapter_config.json)")
        parser.add_argument("--label", default=None, help="row name in the tables (default: the adapter folder's name, or base)")
    four = parser.add_mutually_exclusive_group()
    four.add_argument("--4bit", dest="load_in_4bit", action="store_true", default=None, help="load the base model in NF4")
    four.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="load the base model unquantised")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                        help="weights / compute dtype (default: the recipe's model.dtype)")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model: MCQ accuracy (Table 3), BERTScore (Table 4)")
    sub = parser.add_subparsers(dest="eval_command", required=True)

    mcq = sub.add_parser("mcq", help="multiple-choice accuracy with bootstrap CIs; writes predictions and table3")
    _model_args(mcq)
    mcq.add_argument("--sets", default=None, help="comma-separated names under the eval recipe's sets: (each a "
                     f"source/split; MCQ sources: {', '.join(source_names('mcq'))})")
    mcq.add_argument("--method", choices=["loglik", "generate"], default=None)
    mcq.add_argument("--limit", type=int, default=None, help="questions per set (0 = all; default: the recipe's)")
    mcq.set_defaults(func=cmd_mcq)

    bs = sub.add_parser("bertscore", help="answers to held-out consumer questions scored with BERTScore; table4 + samples.md")
    _model_args(bs)
    bs.add_argument("--n", type=int, default=None, help="number of held-out queries (default: the recipe's)")
    bs.set_defaults(func=cmd_bertscore)

    every = sub.add_parser("all", help="base + the recipe's adapters that exist: MCQ and BERTScore, all tables")
    _model_args(every, adapter=False)
    every.add_argument("--limit", type=int, default=None, help="questions per set (0 = all)")
    every.add_argument("--runs-root", default=None, help="folder holding the recipe's runs (default outputs/<profile>)")
    every.set_defaults(func=cmd_all)

    tables = sub.add_parser("tables", help="rebuild table3/table4/samples.md from the results in the output folder")
    add_common_args(tables)
    tables.add_argument("--reference", default=None, help="reference YAML (default: medlib/reference/paper.yaml)")
    tables.set_defaults(func=cmd_tables)
