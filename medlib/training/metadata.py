"""What a run folder records about itself: run_metadata.json, recipe.resolved.yaml, log_history.*.

Evaluation, chat, serving and export read a run through `medlib.runs.RunRecord`, never through the recipe
that made it: the run folder is the contract.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
from pathlib import Path
from typing import Any

from medlib.config import TrainRecipe, save_resolved
from medlib.data.io import file_sha256
from medlib.models import cuda_available
from medlib.runs import METADATA_FILE, RunRecord, run_base_model  # noqa: F401  (the run-folder contract lives in medlib.runs)

LOG_COLUMNS = ("step", "epoch", "loss", "eval_loss", "learning_rate")


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "unsloth",
                "unsloth_zoo", "xformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def memory_allocator() -> str:
    """The C allocator behind this process's CPU tensors: peak RSS depends on it (benchmarks/README.md)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return "unknown"
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "system malloc"


def peak_memory() -> dict[str, Any]:
    out: dict[str, Any] = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                           "allocator": memory_allocator()}
    if cuda_available():
        import torch

        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def device_name() -> str:
    if cuda_available():
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def write_log_history(history: list[dict[str, Any]], run_dir: Path) -> None:
    """log_history.json (Trainer's list, as is) and log_history.csv (one row per train/eval log)."""
    (run_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    with open(run_dir / "log_history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for entry in history:
            if "loss" in entry or "eval_loss" in entry:
                writer.writerow({k: entry.get(k, "") for k in LOG_COLUMNS})


def run_metadata(recipe: TrainRecipe, base_path: str, backend: str, fallbacks: list[str], stage1: Path | None,
                 manifest: dict[str, Any], train_report: Any, eval_report: Any, precision: dict[str, str],
                 system_prompt: str, tokenizer: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """run_metadata.json as written when training starts (status "running")."""
    return {
        "profile": recipe.profile, "profile_note": recipe.note,
        "stage": recipe.stage, "run_name": recipe.run_name, "display_name": recipe.display_name or recipe.run_name,
        "base_model": recipe.model.name, "base_model_path": base_path,
        "backend": backend, "fallbacks": fallbacks, "handoff": recipe.handoff if recipe.stage == 2 else None,
        "from_stage1": str(stage1) if stage1 else None,
        "from_stage1_adapter_sha256": file_sha256(stage1 / "adapter_model.safetensors") if stage1 else None,
        "seed": recipe.seed,
        "data": {**manifest, "train": train_report.as_dict(), "validation": eval_report.as_dict()},
        "precision": precision,
        # What a chat, evaluation or export of this run must use: the prompt and template it was trained with.
        "system_prompt": system_prompt, "chat_template": getattr(tokenizer, "chat_template", None),
        "target_style": recipe.prompt.target_style, "mcq_format": recipe.prompt.mcq_format,
        "fidelity": fidelity_settings(recipe),
        "training_args": {k: settings[k] for k in ("optim", "bf16", "fp16", "gradient_checkpointing", "packing",
                                                        "padding_free", "max_steps", "max_length")},
        "libraries": library_versions(), "device": device_name(),
        "recipe_file": recipe.meta.recipe_file, "status": "running",
    }


def fidelity_settings(recipe: TrainRecipe) -> dict[str, Any]:
    """The choices where the paper's text, the authors' notebooks and medlib differ
    (data_cards/fidelity.md), as this run made them; results and tables quote them."""
    t, d = recipe.training, recipe.data
    return {"chat_template": recipe.prompt.chat_template, "mcq_format": recipe.prompt.mcq_format,
            "target_style": recipe.prompt.target_style, "loss_on": t.loss_on,
            "packing": t.packing_strategy if t.packing else "off",
            "batch": f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps}",
            "seeds": {"data": d.seed, "trainer": recipe.seed}, "data_order": d.order,
            "decontaminate": d.decontaminate, "stage1_handoff": recipe.handoff if recipe.stage == 2 else None}


def write_run_files(recipe: TrainRecipe, run_dir: Path, meta: dict[str, Any]) -> None:
    save_resolved(recipe, run_dir / "recipe.resolved.yaml")
    write_metadata(run_dir, meta)


def write_metadata(run_dir: Path, meta: dict[str, Any]) -> None:
    (run_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))


def shipped_adapter(run_dir: Path, recipe: TrainRecipe) -> dict[str, Any]:
    """The adapter the run folder ships: its LoRA rank, and whether it combines stage 1 and stage 2."""
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    combined = recipe.uses_stage1 and recipe.handoff == "stacked"
    return {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora")),
            "combined_stages": combined, "trained_r": recipe.lora.r,
            "description": (f"combined adapter, r = {cfg['r']} (stage 1 r = {cfg['r'] - recipe.lora.r} + stage 2 "
                            f"r = {recipe.lora.r}, stage 1 frozen while stage 2 trained, shipped as one LoRA on the original base)" if combined
                            else f"LoRA adapter, r = {cfg['r']}")}
