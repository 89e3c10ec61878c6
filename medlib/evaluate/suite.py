"""The evaluation suite: the base model and every run an eval recipe names, each loaded once for MCQ
accuracy (Table 3) and BERTScore (Table 4)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medlib.config import EvalRecipe
from medlib.evaluate.bertscore import run_bertscore
from medlib.evaluate.common import load_evaluated
from medlib.evaluate.mcq import run_mcq

log = logging.getLogger(__name__)


def run_all(recipe: EvalRecipe, out_dir: str | Path, runs_root: str | Path, *, include_missing: bool = False,
            mcq: bool = True, bertscore: bool = True) -> dict[str, Any]:
    """The base model plus every run the recipe names (folders under runs_root): MCQ and BERTScore.

    Each model is loaded once for both evaluations. A run whose folder has no adapter_config.json is
    skipped with a logged reason (an error with include_missing=True).
    """
    models: list[tuple[str, Any]] = [("base", None)]
    skipped = {}
    for name in recipe.runs:
        folder = Path(runs_root) / name
        if (folder / "adapter_config.json").exists() or include_missing:
            models.append((name, folder))
        else:
            skipped[name] = f"{folder} has no adapter_config.json (not trained yet?)"
            log.warning("skipping %s: %s", name, skipped[name])
    out: dict[str, Any] = {"mcq": {}, "bertscore": {}, "skipped": skipped}
    for name, adapter in models:
        loaded = load_evaluated(recipe, adapter)
        if mcq:
            out["mcq"][name] = run_mcq(recipe, out_dir, adapter, loaded=loaded)
        if bertscore:
            out["bertscore"][name] = run_bertscore(recipe, out_dir, adapter, loaded=loaded)
        del loaded
    return out
