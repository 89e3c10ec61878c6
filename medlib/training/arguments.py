"""The trainer's arguments, built from the typed recipe in one place (as alignment-handbook builds SFTConfig).

Machine-dependent choices are made here and recorded as fallbacks: 8-bit optimizers and gradient
checkpointing need CUDA, the precision follows the GPU (medlib.models.training_precision).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlib.config import TrainRecipe
from medlib.models import cuda_available, training_precision


def trainer_settings(recipe: TrainRecipe, backend: str, fallbacks: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(SFTConfig keyword arguments, {"mode", "reason"} of the precision), with CPU fallbacks applied and recorded."""
    t = recipe.training
    on_gpu = cuda_available()
    optim = t.optim
    if not on_gpu and "8bit" in optim:
        fallbacks.append(f"optim {optim} -> adamw_torch (8-bit optimizers need CUDA)")
        optim = "adamw_torch"
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
    settings = {
        "learning_rate": t.learning_rate, "weight_decay": t.weight_decay,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "warmup_steps": t.warmup_steps, "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps, "optim": optim, "lr_scheduler_type": t.lr_scheduler_type,
        "logging_steps": t.logging_steps, "logging_first_step": True,
        "eval_strategy": "steps", "eval_steps": t.eval_steps,
        "save_strategy": "steps", "save_steps": t.save_steps, "save_total_limit": t.save_total_limit,
        "packing": trl_packing, "padding_free": t.padding_free or trl_packing, "packing_strategy": "bfd",
        # Records are truncated to max_seq_length when tokenised; padding-free without packing must get None.
        "max_length": None if (t.padding_free and not trl_packing) else recipe.model.max_seq_length,
        "bf16": precision == "bf16", "fp16": precision == "fp16",
        "gradient_checkpointing": bool(checkpointing),
        "seed": recipe.seed, "data_seed": recipe.seed,
        "report_to": [], "use_cpu": not on_gpu, "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
    }
    return settings, {"mode": precision, "reason": why}


def sft_config(settings: dict[str, Any], output_dir: Path, has_validation: bool) -> Any:
    from trl import SFTConfig

    if not has_validation:
        settings = {**settings, "eval_strategy": "no"}
    return SFTConfig(output_dir=str(output_dir), **settings)
