"""`medlib eval`: MCQ accuracy (Table 3), BERTScore (Table 4) and side-by-side answers.

Python API for notebooks (torch and transformers are imported inside the functions that need them):

    from medlib import config
    from medlib.evaluate import run_mcq, run_bertscore, run_all, write_table3
    recipe = config.load_eval("local")                                     # typed EvalRecipe
    base = run_mcq(recipe, "outputs/local/eval")                           # the recipe's base model
    mix = run_mcq(recipe, "outputs/local/eval", "outputs/local/med-mix")   # + a run folder's adapter
    write_table3(out_dir="outputs/local/eval")                             # every result in that folder
"""

from medlib.evaluate.bertscore import run_bertscore
from medlib.evaluate.mcq import run_mcq
from medlib.evaluate.suite import run_all
from medlib.evaluate.tables import write_samples, write_table3, write_table4

__all__ = ["run_mcq", "run_bertscore", "run_all", "write_table3", "write_table4", "write_samples"]
