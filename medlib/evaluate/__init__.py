"""`medlib eval`: MCQ accuracy (Table 3), BERTScore (Table 4) and side-by-side answers.

Python API for notebooks (heavy imports happen inside the functions):

    from medlib import config
    from medlib.evaluate import run_mcq, run_bertscore, run_all, write_table3
    recipe = config.load_eval("local")                                     # typed EvalRecipe
    base = run_mcq(recipe, "outputs/local/eval")                           # the recipe's base model
    mix = run_mcq(recipe, "outputs/local/eval", "outputs/local/med-mix")   # + a run folder's adapter
    write_table3(out_dir="outputs/local/eval")                             # every result in that folder
"""

from __future__ import annotations

from typing import Any


def run_mcq(*args: Any, **kwargs: Any) -> dict:
    from medlib.evaluate.mcq import run_mcq as _run

    return _run(*args, **kwargs)


def run_bertscore(*args: Any, **kwargs: Any) -> dict:
    from medlib.evaluate.bertscore import run_bertscore as _run

    return _run(*args, **kwargs)


def run_all(*args: Any, **kwargs: Any) -> dict:
    from medlib.evaluate.cli import run_all as _run

    return _run(*args, **kwargs)


def write_table3(*args: Any, **kwargs: Any):
    from medlib.evaluate.tables import write_table3 as _write

    return _write(*args, **kwargs)


def write_table4(*args: Any, **kwargs: Any):
    from medlib.evaluate.tables import write_table4 as _write

    return _write(*args, **kwargs)


def write_samples(*args: Any, **kwargs: Any):
    from medlib.evaluate.tables import write_samples as _write

    return _write(*args, **kwargs)


__all__ = ["run_mcq", "run_bertscore", "run_all", "write_table3", "write_table4", "write_samples"]
