"""`medlib eval mcq|bertscore|all|tables`."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Iterable

log = logging.getLogger(__name__)


def run_all(profile: str = "local", *, include_missing: bool = False, mcq: bool = True, bertscore: bool = True,
            overrides: Iterable[str] = (), **kwargs: Any) -> dict[str, Any]:
    """Base model plus every adapter in the eval recipe's model.adapters that exists: MCQ and BERTScore.

    Each model is loaded once for both evaluations. Adapters whose folder has no adapter_config.json
    are skipped with a logged reason (an error with include_missing=True).
    """
    from medlib.config import get
    from medlib.evaluate import common
    from medlib.evaluate.bertscore import run_bertscore
    from medlib.evaluate.mcq import run_mcq
    from medlib.paths import resolve

    overrides = list(overrides)
    recipe = common.eval_recipe(profile, overrides, model=kwargs.get("model"), out=kwargs.get("out"))
    runs: list[tuple[str, Any]] = [("base", None)]
    skipped = {}
    for label, folder in (get(recipe, "model.adapters", None) or {}).items():
        if (resolve(folder) / "adapter_config.json").exists() or include_missing:
            runs.append((label, folder))
        else:
            skipped[label] = f"{resolve(folder)} has no adapter_config.json (not trained yet?)"
            log.warning("skipping %s: %s", label, skipped[label])
    four_bit = kwargs.pop("load_in_4bit", None)
    four_bit = bool(get(recipe, "model.load_in_4bit")) if four_bit is None else four_bit
    dtype = common.resolve_dtype(kwargs.pop("dtype", None) or get(recipe, "model.dtype", "float32"))
    out: dict[str, Any] = {"mcq": {}, "bertscore": {}, "skipped": skipped}
    for label, adapter in runs:
        loaded_model, tokenizer, _ = common.load_model(get(recipe, "model.name"), adapter, load_in_4bit=four_bit, dtype=dtype)
        shared = dict(kwargs, label=label, overrides=overrides, load_in_4bit=four_bit, dtype=dtype,
                      loaded=(loaded_model, tokenizer))
        if mcq:
            out["mcq"][label] = run_mcq(profile, adapter, **{k: v for k, v in shared.items() if k != "n"})
        if bertscore:
            out["bertscore"][label] = run_bertscore(profile, adapter, **{k: v for k, v in shared.items()
                                                                         if k not in ("sets", "method", "limit")})
        del loaded_model
    return out


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
    from medlib.evaluate.mcq import run_mcq

    results = run_mcq(args.profile, args.adapter, model=args.model, sets=args.sets, method=args.method,
                      limit=args.limit, data_dir=args.data_dir, out=args.out, label=args.label,
                      overrides=args.overrides, load_in_4bit=args.load_in_4bit, dtype=args.dtype)
    print(_summary_mcq(results))
    print("tables:", ", ".join(results.get("table3", [])))
    return 0


def cmd_bertscore(args: argparse.Namespace) -> int:
    from medlib.evaluate.bertscore import run_bertscore

    results = run_bertscore(args.profile, args.adapter, model=args.model, n=args.n, data_dir=args.data_dir, out=args.out,
                            label=args.label, overrides=args.overrides, load_in_4bit=args.load_in_4bit, dtype=args.dtype)
    s = results["scores"]
    print(f"{results['display_name']}: BERTScore P {s['precision']:.4f} R {s['recall']:.4f} F1 {s['f1']:.4f} "
          f"over {results['n']} ({results['decoding']}); hash {results['bertscore']['hash']}")
    print("tables:", ", ".join(results.get("table4", [])), results.get("samples", ""))
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    out = run_all(args.profile, model=args.model, data_dir=args.data_dir, out=args.out, overrides=args.overrides,
                  load_in_4bit=args.load_in_4bit, dtype=args.dtype, limit=args.limit)
    for results in out["mcq"].values():
        print(_summary_mcq(results))
    for results in out["bertscore"].values():
        print(f"{results['display_name']}: BERTScore F1 {results['scores']['f1']:.4f}")
    for label, why in out["skipped"].items():
        print(f"skipped {label}: {why}")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from medlib.config import get
    from medlib.evaluate.common import eval_recipe
    from medlib.evaluate.tables import collect_results, write_samples, write_table3, write_table4
    from medlib.paths import resolve

    recipe = eval_recipe(args.profile, args.overrides, out=args.out)
    out_dir = resolve(get(recipe, "output_dir"))
    written = [*write_table3(out_dir=out_dir, reference_file=args.reference)]
    if collect_results(out_dir, "bertscore"):
        written += [*write_table4(out_dir=out_dir, reference_file=args.reference),
                    write_samples(out_dir=out_dir, k=int(get(recipe, "bertscore.samples_k")))]
    print("\n".join(str(p) for p in written))
    return 0


def _model_args(parser: argparse.ArgumentParser, adapter: bool = True) -> None:
    from medlib.cli import add_common_args

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
    mcq.add_argument("--sets", default=None, help="comma-separated: medqa,medmcqa,pubmedqa,pubmedqa_test,mmlu_med")
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
    every.set_defaults(func=cmd_all)

    tables = sub.add_parser("tables", help="rebuild table3/table4/samples.md from the results in the output folder")
    from medlib.cli import add_common_args

    add_common_args(tables)
    tables.add_argument("--reference", default=None, help="reference YAML (default: medlib/reference/paper.yaml)")
    tables.set_defaults(func=cmd_tables)
