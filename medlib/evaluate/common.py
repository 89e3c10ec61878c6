"""Shared by MCQ and BERTScore evaluation: what one evaluated model is, model loading, file output."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlib.config import EvalRecipe
from medlib.models import adapter_chain, load_for_inference, resolve_dtype
from medlib.paths import default_data_dir, resolve
from medlib.prompts import apply_chat_template_choice, effective_system_prompt
from medlib.runs import RunRecord, load_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluatedModel:
    """One row of Table 3 / Table 4: the base model, plus (optionally) a training run's adapter.
    Its name, prompt and place in the tables come from the run folder (the run's record), not a recipe."""

    recipe: EvalRecipe
    adapter: Any
    label: str
    display_name: str
    stage: int                     # 0 base model, 1 or 2 a training stage (orders the table rows)
    system_prompt: str
    mcq_format: str                # the question's user turn the run was trained with (medlib.prompts)
    load_in_4bit: bool
    dtype: str
    fidelity: Any = None           # the run's fidelity choices (medlib.training.metadata.fidelity_settings)

    @classmethod
    def of(cls, recipe: EvalRecipe, adapter: Any = None, label: str | None = None) -> "EvaluatedModel":
        chain = adapter_chain(adapter)
        record = RunRecord.read(chain[-1]) if chain and (chain[-1] / "adapter_config.json").exists() else None
        display_name = label or (record.display_name if record else "Base")
        label = label or (chain[-1].name if chain else "base")
        prompt = recipe.prompt.system_prompt or (record.system_prompt if record else None)
        return cls(recipe=recipe, adapter=adapter, label=label, display_name=display_name,
                   stage=int(record.metadata.get("stage", 2)) if record else 0,
                   system_prompt=effective_system_prompt(prompt),
                   # the base row is asked as the recipe's prompt says (paper: the runs' chatml and format)
                   mcq_format=(record.mcq_format if record and record.mcq_format else recipe.prompt.mcq_format),
                   load_in_4bit=recipe.model.load_in_4bit,
                   dtype=resolve_dtype(recipe.model.dtype),
                   fidelity=record.metadata.get("fidelity") if record else None)

    def folder(self, out_dir: Path, kind: str) -> Path:
        return Path(out_dir) / kind / self.label

    def load(self, loaded: tuple[Any, Any] | None = None) -> tuple[Any, Any, list[Path]]:
        """(model, tokenizer, adapter chain): `loaded` is reused as is (a model loaded once for both evaluations)."""
        if loaded is not None:
            lm, tokenizer = loaded
        else:
            lm, tokenizer = load_evaluated(self.recipe, self.adapter)
        prepare_tokenizer(tokenizer)
        return lm, tokenizer, adapter_chain(self.adapter)

    def weights_description(self, chain: list[Path]) -> str:
        """Which weights were scored, in words (Table 3 prints it under the row)."""
        if not chain:
            return f"{self.recipe.model.name} ({'NF4' if self.load_in_4bit else 'as its checkpoint holds it'})"
        if self.recipe.model.weights == "requantized_merge":
            return "the run merged in 16-bit and reloaded in 4-bit (the authors' evaluation)"
        record = RunRecord.read(chain[-1])
        return (f"the adapter on the weights it trained against: {record.trained_against['model']}"
                f"{' in NF4' if record.weights_in_4bit else ''}")

    def identity(self, lm: Any, chain: list[Path]) -> dict[str, Any]:
        """What every results.json says about the model that produced it."""
        return {"label": self.label, "display_name": self.display_name, "stage": self.stage,
                "profile": self.recipe.profile, "note": self.recipe.note, "tables_note": self.recipe.report.tables_note,
                "model": self.recipe.model.name,
                "adapters": [str(p) for p in chain], "load_in_4bit": self.load_in_4bit, "dtype": model_dtype(lm),
                "weights": self.weights_description(chain),
                "system_prompt": self.system_prompt, "training_fidelity": self.fidelity, "recipe": {"recipe_file": self.recipe.meta.recipe_file,
                                                                "overrides": list(self.recipe.meta.overrides)}}


def load_evaluated(recipe: EvalRecipe, adapter: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of one Table 3 / Table 4 row: the base model, or a run as recipe.model.weights says."""
    chain = adapter_chain(adapter)
    if len(chain) > 1:  # an explicit chain of adapters, applied in order on the recipe's base
        return load_for_inference(recipe.model.name, chain, recipe.model.load_in_4bit, recipe.model.dtype)
    model, tokenizer = load_run(recipe.model.name, chain[0] if chain else None, recipe.model.load_in_4bit,
                                recipe.model.dtype, recipe.model.weights)
    if not chain:  # a run's tokenizer carries the template it trained with; the base gets the recipe's
        tokenizer = apply_chat_template_choice(tokenizer, recipe.prompt.chat_template)
    return model, tokenizer


def eval_folders(recipe: EvalRecipe) -> list[Path | None]:
    """Where evaluation sets are looked for: the recipe's data_dir, else the shared data folder."""
    return [resolve(recipe.data.data_dir) if recipe.data.data_dir else default_data_dir()]


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding, so the last position of every row is the answer position (batched scoring and generation)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def environment() -> dict[str, Any]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def model_dtype(model: Any) -> str:
    try:
        return str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:  # pragma: no cover
        return "unknown"


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
