"""The trainer's arguments, built from the typed recipe in one place (as alignment-handbook builds SFTConfig).

The recipe's `training:` keys are SFTConfig's own field names: they pass as they are (dataclasses.asdict), so a
new TRL argument needs no medlib code (`training.sft:` passes any other one through, checked when the recipe
loads). Machine-dependent choices are made here and recorded as fallbacks: 8-bit optimizers and gradient
checkpointing need CUDA, the precision follows the GPU (medlib.models.training_precision).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from medlib.config import MEDLIB_ONLY, TrainRecipe
from medlib.models import cuda_available, training_precision


def trainer_settings(recipe: TrainRecipe, backend: str, fallbacks: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(SFTConfig keyword arguments, {"mode", "reason"} of the precision). The recipe's training keys are SFTConfig's
    own and pass as they are, but for the MEDLIB_ONLY ones; machine fallbacks are applied and recorded; what medlib
    always sets follows; training.sft passes any other SFTConfig argument through last."""
    t = recipe.training
    on_gpu = cuda_available()
    settings = {k: v for k, v in dataclasses.asdict(t).items() if k not in MEDLIB_ONLY}
    if not on_gpu and "8bit" in t.optim:
        fallbacks.append(f"optim {t.optim} -> adamw_torch (8-bit optimizers need CUDA)")
        settings["optim"] = "adamw_torch"
    precision, why = training_precision(t.precision)
    checkpointing = t.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = on_gpu  # CPU: memory is ample at the local sizes, and recomputation would only cost time
        if not on_gpu:
            fallbacks.append("gradient_checkpointing auto -> off on CPU")
    if backend == "unsloth":
        checkpointing = False  # Unsloth's own checkpointing (use_gradient_checkpointing="unsloth") is already on the model
    # constant_length rows are packed by medlib before the trainer sees them (all exactly max_length long)
    trl_packing = t.packing and t.packing_strategy == "bfd"
    if trl_packing and not t.padding_free:
        fallbacks.append("packing uses TRL's bfd strategy, which is padding-free")
    if t.packing and t.packing_strategy == "constant_length" and t.loss_on != "all":
        raise ValueError("training.packing_strategy constant_length trains on the whole text: set training.loss_on: all")
    settings.update({
        "gradient_checkpointing": bool(checkpointing),
        "packing": trl_packing, "padding_free": t.padding_free or trl_packing, "packing_strategy": "bfd",
        # Records are truncated to max_seq_length when tokenised; padding-free without packing must get None.
        "max_length": None if (t.padding_free and not trl_packing) else recipe.model.max_seq_length,
        "bf16": precision == "bf16", "fp16": precision == "fp16",
        "logging_first_step": True, "eval_strategy": "steps", "save_strategy": "steps",
        "seed": recipe.seed, "data_seed": recipe.seed,
        "report_to": [], "use_cpu": not on_gpu, "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
    })
    settings.update(t.sft)
    return settings, {"mode": precision, "reason": why}


def sft_config(settings: dict[str, Any], output_dir: Path, has_validation: bool) -> Any:
    from trl import SFTConfig

    if not has_validation:
        settings = {**settings, "eval_strategy": "no"}
    return SFTConfig(output_dir=str(output_dir), **settings)
