"""`medlib train`: two-stage QLoRA. Stage 1 (Med-Mix) on MCQ mixtures, stage 2 (Med-Nirvana) on dialogues.

    medlib train --stage 1 --profile local
    medlib train --stage 2 --profile local --from outputs/local/med-mix
    medlib train --stage 1 --profile paper --set training.max_steps=200 --resume
    medlib train --recipe chatdoctor --profile local     # any recipe in medlib/recipes/<profile>/

Python (notebooks):  run_dir = medlib.train.train(medlib.train.load_recipe_for(1, "local"))

Backend: `unsloth` on a CUDA GPU when it imports, else `hf` (transformers + bitsandbytes NF4 +
peft + TRL SFTTrainer). Both read the same recipe and the same pre-tokenised data; every choice
and fallback is logged and written to `run_metadata.json`.

Several GPUs (hf backend, data parallel; the recipe's batch size is per device):

    accelerate launch --num_processes 4 -m medlib train --stage 1 --profile paper --set model.backend=hf

Stage 2 `init: merge` (default) folds the stage-1 adapter into the base and trains a fresh adapter:
stage 2 then gets the full rank-16 capacity for dialogue while the MCQ knowledge sits in the
(frozen) weights, exactly as the paper continues from the Med-Mix model; the result is shipped as
one adapter on the original base (see medlib/training/adapters.py). `init: continue` keeps training
the stage-1 adapter instead (one rank-16 adapter shared by both stages). `init: base` trains one
dialogue stage straight from the base model, with no stage 1: the seeds' single-stage chatbots
(recipes `chatdoctor` and `llama3_chatbot`).

Outputs, in outputs/<run>/ (recipe `output_dir`, or --out):
  adapter_model.safetensors + adapter_config.json + tokenizer files   the model (load with peft)
  recipe.resolved.yaml, log_history.json/.csv, run_metadata.json        what was done and how it went
  checkpoints/checkpoint-N/                                             for --resume
  merged_16bit/ (export_merged_16bit), gguf/ (export_gguf, unsloth)     optional exports
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from medlib import config
from medlib.config import RecipeError, get
from medlib.paths import resolve

log = logging.getLogger(__name__)

STAGES = (1, 2)
INIT_MODES = ("merge", "continue", "base")  # base: one stage from the base model (the seeds' chatbots)
LOG_COLUMNS = ("step", "epoch", "loss", "eval_loss", "learning_rate")
MIXTURE_FILES = ("train.jsonl", "validation.jsonl", "manifest.json")


class TrainError(RuntimeError):
    """A run cannot start or go on; the message names the file or setting."""


# ----------------------------------------------------------------------------------------------- recipe


def load_recipe_for(stage: int, profile: str = "local", overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The stage's recipe (medlib/recipes/<profile>/stage<N>.yaml) with `key=value` overrides applied."""
    if int(stage) not in STAGES:
        raise RecipeError(f"unknown stage {stage!r}; choose 1 or 2")
    return config.load_recipe(profile, f"stage{int(stage)}", list(overrides))


def _check_recipe(recipe: dict[str, Any]) -> int:
    stage = int(get(recipe, "stage"))
    if stage not in STAGES:
        raise RecipeError(f"recipe stage {stage!r} must be 1 or 2")
    if stage == 2 and get(recipe, "init") not in INIT_MODES:
        raise RecipeError(f"recipe init {get(recipe, 'init')!r} must be one of {', '.join(INIT_MODES)}")
    for key in ("model.name", "model.max_seq_length", "lora.r", "training.learning_rate",
                "training.per_device_train_batch_size", "data.mixture_dir", "output_dir", "seed"):
        get(recipe, key)
    if int(get(recipe, "training.max_steps")) == 0:
        raise RecipeError("training.max_steps is 0: nothing to train (-1 means one full epoch)")
    return stage


# ------------------------------------------------------------------------------------------------- data


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_mixture(recipe: dict[str, Any]) -> Path:
    """The mixture folder: read it when built, else build it with medlib.data.mixtures.build_mixture."""
    mixture_dir = resolve(get(recipe, "data.mixture_dir"))
    if all((mixture_dir / name).exists() for name in MIXTURE_FILES):
        log.info("using the built mixture in %s", mixture_dir)
        return mixture_dir
    data_dir = get(recipe, "data.data_dir", None)
    if data_dir is not None and not resolve(data_dir).is_dir():
        raise TrainError(f"data.data_dir {resolve(data_dir)} does not exist; the mixture {mixture_dir} "
                         "cannot be built (set --data-dir or data.data_dir)")
    from medlib.data.mixtures import build_mixture

    log.info("mixture %s is not built yet: building it", mixture_dir)
    return Path(build_mixture(recipe))


def read_mixture(mixture_dir: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    from medlib.data.io import read_jsonl
    from medlib.data.validate import record_problem

    missing = [n for n in MIXTURE_FILES if not (mixture_dir / n).exists()]
    if missing:
        raise TrainError(f"mixture {mixture_dir} lacks {', '.join(missing)}")
    splits = {}
    for split in ("train", "validation"):
        path = mixture_dir / f"{split}.jsonl"
        records = read_jsonl(path)
        for row, record in enumerate(records, start=1):
            problem = record_problem(record)
            if problem:
                raise TrainError(f"{path} line {row} (id {record.get('id')!r}): {problem}")
        splits[split] = records
    if not splits["train"]:
        raise TrainError(f"mixture {mixture_dir} is empty: {mixture_dir / 'train.jsonl'} has no records")
    manifest = {"mixture_dir": str(mixture_dir), "manifest_sha256": _sha256(mixture_dir / "manifest.json")}
    try:
        content = json.loads((mixture_dir / "manifest.json").read_text())
        manifest["sources"] = content.get("counts") or content.get("sources")
        manifest["content_hash"] = content.get("content_hash")
    except (ValueError, AttributeError):
        pass
    return splits["train"], splits["validation"], manifest


def _sample(records: list[dict], n: Any, seed: int) -> list[dict]:
    """A fixed, seeded subset (n: None = all). Used for max_train_samples / max_eval_samples."""
    if n is None or int(n) < 0 or int(n) >= len(records):
        return records
    import random

    rng = random.Random(seed)
    return [records[i] for i in sorted(rng.sample(range(len(records)), int(n)))]


# ----------------------------------------------------------------------------------------------- checks


def _check_model_available(name: str) -> str:
    """Fail fast (before data or weights are loaded) when the base model cannot be found."""
    from medlib.models import hub_error_hint, resolve_model_path

    path = resolve_model_path(name)
    if Path(path).exists():
        return path
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(path, "config.json", local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    except Exception as exc:  # offline and not cached, no such repo, no network
        raise hub_error_hint(name, exc) from None
    return path


def _stage1_dir(recipe: dict[str, Any], from_dir: str | os.PathLike | None) -> Path:
    stage1 = resolve(from_dir if from_dir is not None else get(recipe, "from_stage1"))
    if not (stage1 / "adapter_config.json").exists():
        raise TrainError(f"stage 2 needs a finished stage-1 run: {stage1} has no adapter_config.json "
                         "(run `medlib train --stage 1` first, or pass --from DIR)")
    return stage1


def _stage1_base(stage1: Path) -> str:
    meta_path = stage1 / "run_metadata.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())["base_model"]
    return json.loads((stage1 / "adapter_config.json").read_text())["base_model_name_or_path"]


# ---------------------------------------------------------------------------------------------- helpers


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


def peak_memory() -> dict[str, float]:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    from medlib.models import cuda_available

    if cuda_available():
        import torch

        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def write_log_history(history: list[dict[str, Any]], run_dir: Path) -> None:
    """log_history.json (Trainer's list, as is) and log_history.csv (one row per train/eval log)."""
    (run_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    with open(run_dir / "log_history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for entry in history:
            if "loss" in entry or "eval_loss" in entry:
                writer.writerow({k: entry.get(k, "") for k in LOG_COLUMNS})


def _training_settings(recipe: dict[str, Any], backend: str, fallbacks: list[str]) -> dict[str, Any]:
    """Recipe -> SFTConfig kwargs, with the CPU fallbacks applied and recorded."""
    from medlib.models import cuda_available

    t = get(recipe, "training")
    on_gpu = cuda_available()
    optim = t["optim"]
    if not on_gpu and "8bit" in optim:
        fallbacks.append(f"optim {optim} -> adamw_torch (8-bit optimizers need CUDA)")
        optim = "adamw_torch"
    from medlib.models import training_precision

    precision, why = training_precision(str(t.get("precision", "auto")))
    gc = t.get("gradient_checkpointing", "auto")
    if gc == "auto":
        gc = on_gpu  # CPU: memory is ample at the local sizes, and recomputation would only cost time
        if not on_gpu:
            fallbacks.append("gradient_checkpointing auto -> off on CPU")
    if backend == "unsloth":
        gc = False  # Unsloth's own checkpointing (use_gradient_checkpointing="unsloth") is already on the model
    packing = bool(t["packing"])
    padding_free = bool(t.get("padding_free", False))
    if packing and not padding_free:
        fallbacks.append("packing uses TRL's bfd strategy, which is padding-free")
    return {
        "learning_rate": float(t["learning_rate"]), "weight_decay": float(t["weight_decay"]),
        "per_device_train_batch_size": int(t["per_device_train_batch_size"]),
        "per_device_eval_batch_size": int(t.get("per_device_eval_batch_size", t["per_device_train_batch_size"])),
        "gradient_accumulation_steps": int(t["gradient_accumulation_steps"]),
        "warmup_steps": int(t["warmup_steps"]), "num_train_epochs": float(t["num_train_epochs"]),
        "max_steps": int(t["max_steps"]), "optim": optim, "lr_scheduler_type": t["lr_scheduler_type"],
        "logging_steps": int(t["logging_steps"]), "logging_first_step": True,
        "eval_strategy": "steps", "eval_steps": int(t["eval_steps"]),
        "save_strategy": "steps", "save_steps": int(t["save_steps"]), "save_total_limit": t["save_total_limit"],
        "packing": packing, "padding_free": padding_free or packing, "packing_strategy": "bfd",
        # Records are truncated to max_seq_length when tokenised; padding-free without packing must get None.
        "max_length": None if (padding_free and not packing) else int(get(recipe, "model.max_seq_length")),
        "bf16": precision == "bf16", "fp16": precision == "fp16", "precision": precision, "precision_reason": why,
        "gradient_checkpointing": bool(gc),
        "seed": int(get(recipe, "seed")), "data_seed": int(get(recipe, "seed")),
        "report_to": [], "use_cpu": not on_gpu, "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
    }


# ------------------------------------------------------------------------------------------------ train


def train(recipe: dict[str, Any], out_dir: str | os.PathLike | None = None,
          from_dir: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
          callbacks: Sequence[Any] = ()) -> Path:
    """Train one stage as the recipe says; returns the run folder. See the module docstring."""
    started = time.time()
    stage = _check_recipe(recipe)
    run_dir = resolve(out_dir if out_dir is not None else get(recipe, "output_dir"))
    ckpt_dir = run_dir / "checkpoints"

    # Cheap checks first: nothing heavy is loaded before every input is known to exist.
    last_checkpoint = find_last_checkpoint(ckpt_dir)
    if resume and last_checkpoint is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", ckpt_dir)
    if not resume and not overwrite and (last_checkpoint or (run_dir / "adapter_config.json").exists()):
        raise TrainError(f"{run_dir} already holds a run; use --resume to continue it, --overwrite to replace it, "
                         "or --out for a new folder")
    stage1 = _stage1_dir(recipe, from_dir) if stage == 2 and get(recipe, "init") != "base" else None
    base_model = get(recipe, "model.name")
    if stage1 is not None and _stage1_base(stage1) != base_model:
        raise TrainError(f"stage-1 run {stage1} was trained on {_stage1_base(stage1)!r}, "
                         f"but this recipe's model.name is {base_model!r}")
    base_path = _check_model_available(base_model)
    # Backend before any transformers import: unsloth must be imported first to patch transformers/TRL.
    from medlib.models import select_backend

    backend, fallbacks = select_backend(get(recipe, "model.backend"))
    mixture_dir = prepare_mixture(recipe)
    train_records, eval_records, manifest = read_mixture(mixture_dir)

    if resume and last_checkpoint and (run_dir / "run_metadata.json").exists():
        previous = json.loads((run_dir / "run_metadata.json").read_text())
        if previous.get("data", {}).get("manifest_sha256") not in (None, manifest["manifest_sha256"]):
            raise TrainError(f"cannot resume {run_dir}: the mixture {mixture_dir} changed since the run started "
                             "(manifest hash differs)")
    if overwrite and not resume and run_dir.exists():
        if any(run_dir.iterdir()) and not ((run_dir / "run_metadata.json").exists() or ckpt_dir.exists()):
            raise TrainError(f"--overwrite: {run_dir} is not a medlib run folder; refusing to delete it")
        if stage1 is not None and stage1.resolve() == run_dir.resolve():
            raise TrainError(f"--overwrite: {run_dir} is the stage-1 run this stage starts from")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    for note in fallbacks:
        log.info("backend: %s", note)
    log.info("stage %s, profile %s, backend %s, run dir %s", stage, recipe.get("profile"), backend, run_dir)
    settings = _training_settings(recipe, backend, fallbacks)
    precision = {"mode": settings.pop("precision"), "reason": settings.pop("precision_reason")}
    log.info("precision: %s (%s)", precision["mode"], precision["reason"])
    seed = int(get(recipe, "seed"))

    import torch
    from transformers import set_seed

    set_seed(seed)
    init = get(recipe, "init", None) if stage == 2 else None
    train_from, continue_adapter = base_path, None
    if stage == 2 and init == "merge":
        train_from = str(run_dir / "init_stage1_merged")
        from medlib.training.backends import merge_adapter_into_base

        if not (Path(train_from) / "config.json").exists():
            log.info("merging the stage-1 adapter %s into %s", stage1, base_model)
            merge_adapter_into_base(base_path, stage1, Path(train_from), backend)
    elif stage == 2 and init == "continue":
        continue_adapter = stage1

    from medlib.training.backends import load_for_training

    model, tokenizer = load_for_training(recipe, backend, train_from, continue_adapter,
                                         settings["gradient_checkpointing"], precision["mode"])

    from medlib.prompts import SYSTEM_PROMPT
    from medlib.training.tokenize import tokenize_records

    system_prompt = get(recipe, "prompt.system_prompt", None) or SYSTEM_PROMPT
    target_style = get(recipe, "prompt.target_style", "letter")
    max_len = int(get(recipe, "model.max_seq_length"))
    train_records = _sample(train_records, get(recipe, "training.max_train_samples", None), seed)
    eval_records = _sample(eval_records, get(recipe, "training.max_eval_samples", None), seed)
    train_rows, train_report = tokenize_records(tokenizer, train_records, max_len, system_prompt, target_style)
    eval_rows, eval_report = tokenize_records(tokenizer, eval_records, max_len, system_prompt, target_style)
    for split, rep in (("train", train_report), ("validation", eval_report)):
        if rep.cut_to_fit:
            log.info("%s: cut to fit %d tokens, answer kept: %s", split, max_len,
                     ", ".join(f"{n} by the start of their {what}" for what, n in rep.cut_to_fit.items()))
        if rep.truncated or rep.dropped_no_target:
            log.warning("%s: %d records longer than %d tokens were truncated; %d lost their whole answer and "
                        "were dropped (ids in run_metadata.json)", split, rep.truncated, max_len,
                        len(rep.dropped_no_target))
    if not train_rows:
        raise TrainError(f"no training record of {mixture_dir} fits in {max_len} tokens with its answer")

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not eval_rows:
        settings["eval_strategy"] = "no"
        fallbacks.append("validation split is empty (or max_eval_samples=0): no periodic validation loss")
    args = SFTConfig(output_dir=str(ckpt_dir), **settings)
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        callbacks=list(callbacks),
    )
    if not settings["bf16"]:
        # TRL casts a quantised model's LoRA weights to bf16 (the QLoRA paper's choice on GPU). Without bf16
        # (CPU: slow and lossy; fp16 on a T4: the grad scaler needs float32 weights) they are kept in float32.
        cast = [p for p in trainer.model.parameters() if p.requires_grad and p.dtype == torch.bfloat16]
        for param in cast:
            param.data = param.data.float()
        if cast:
            fallbacks.append(f"LoRA weights kept in float32 (precision {precision['mode']}, no bf16)")

    metadata = {
        "profile": recipe.get("profile"),
        "profile_note": ("paper profile: the paper's settings" if recipe.get("profile") == "paper" else
                         "LOCAL profile: CPU-sized stand-in, not the paper's model, data or numbers"),
        "stage": stage, "run_name": recipe.get("run_name"), "base_model": base_model, "base_model_path": base_path,
        "backend": backend, "fallbacks": fallbacks, "init": init,
        "from_stage1": str(stage1) if stage1 else None,
        "from_stage1_adapter_sha256": _sha256(stage1 / "adapter_model.safetensors") if stage1 else None, "seed": seed,
        "data": {**manifest, "train": train_report.as_dict(), "validation": eval_report.as_dict()},
        "precision": precision,
        # What a chat or export of this run must use: the prompt it was trained with, its chat template.
        "system_prompt": system_prompt, "chat_template": getattr(tokenizer, "chat_template", None),
        "training_args": {k: settings[k] for k in ("optim", "bf16", "fp16", "gradient_checkpointing", "packing",
                                                   "padding_free", "max_steps", "max_length")},
        "libraries": library_versions(), "device": _device_name(),
        "recipe_file": recipe.get("_meta", {}).get("recipe_file"), "status": "running",
    }
    config.save_resolved(recipe, run_dir / "recipe.resolved.yaml")
    (run_dir / "run_metadata.json").write_text(json.dumps(metadata, indent=2))

    resume_from = last_checkpoint if resume else None
    metadata["resumed_from"] = resume_from
    train_started = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        write_log_history(trainer.state.log_history, run_dir)
    train_seconds = time.time() - train_started

    # Final adapter + tokenizer at the top of the run folder. After `init: merge` the stage-2 adapter is
    # relative to base + stage 1, so it is kept aside and the shipped adapter combines both stages.
    if stage == 2 and init == "merge":
        from medlib.training.adapters import combine_adapters

        stage2_only = run_dir / "stage2_adapter"
        trainer.model.save_pretrained(str(stage2_only), safe_serialization=True)
        combine_adapters(stage1, stage2_only, run_dir, base_model)
    else:
        trainer.model.save_pretrained(str(run_dir), safe_serialization=True)
    from medlib.models import name_adapter_base

    name_adapter_base(run_dir, base_model)
    tokenizer.save_pretrained(str(run_dir))

    exports = {}
    t = get(recipe, "training")
    if t.get("export_merged_16bit"):
        from medlib.training.backends import export_merged

        exports["merged_16bit"] = str(export_merged(trainer.model, tokenizer, backend, run_dir / "merged_16bit",
                                                    base_path, run_dir))
    if t.get("export_gguf"):
        from medlib.training.backends import export_gguf

        exports["gguf"] = str(export_gguf(trainer.model, tokenizer, backend, run_dir / "gguf", t["export_gguf"]))
    if stage == 2 and init == "merge":
        shutil.rmtree(run_dir / "init_stage1_merged", ignore_errors=True)  # large; rebuilt if ever needed

    metadata.update({
        "status": "finished", "global_step": trainer.state.global_step,
        "train_loss": getattr(result, "training_loss", None),
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "wall_time_s": round(time.time() - started, 1), "train_time_s": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(1, trainer.state.global_step - _step_of(resume_from)), 3),
        "memory": peak_memory(), "exports": exports,
    })
    (run_dir / "run_metadata.json").write_text(json.dumps(metadata, indent=2))
    log.info("finished: %s (%d steps, %.0f s)", run_dir, trainer.state.global_step, metadata["wall_time_s"])
    return run_dir


def _comparable(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe's settings as saved in recipe.resolved.yaml, without the bookkeeping in _meta."""
    return {k: v for k, v in json.loads(json.dumps(recipe, default=str)).items() if k != "_meta"}


def plan_run(recipe: dict[str, Any], resume: bool | None = None, overwrite: bool = False) -> tuple[str, str]:
    """What a notebook's (re)run of this stage does, as (action, sentence); nothing is deleted unless overwrite.

    action is one of:
      "train"     no run here yet;
      "resume"    a checkpoint exists and resume is None (the default) or True: continue from it;
      "keep"      a finished run with exactly these settings exists: keep it, train nothing;
      "overwrite" overwrite=True: replace whatever is there (checkpoints included).
    A checkpoint with resume=False, or a finished run with other settings, is a TrainError that
    names the choice to make; a Colab disconnect therefore never costs the checkpoints.
    """
    run_dir = resolve(get(recipe, "output_dir"))
    checkpoint = find_last_checkpoint(run_dir / "checkpoints")
    meta_file = run_dir / "run_metadata.json"
    finished = meta_file.exists() and json.loads(meta_file.read_text()).get("status") == "finished"
    if overwrite:
        if checkpoint or finished or (run_dir / "adapter_config.json").exists():
            return "overwrite", f"overwrite=True: deleting the run in {run_dir} (checkpoints included) and training anew"
        return "train", f"overwrite=True, but {run_dir} holds no run yet: training from step 0"
    if finished:
        changed = _changed_since(recipe, run_dir, json.loads(meta_file.read_text()))
        if not changed:
            return "keep", (f"{run_dir} already holds a finished run with these settings and inputs: kept, nothing "
                            "trained (overwrite=True retrains it)")
        raise TrainError(f"{run_dir} holds a finished run with other settings or inputs (differs in: "
                         f"{', '.join(changed)}); pass overwrite=True to replace it, or choose another out_dir")
    if checkpoint:
        if resume is False:
            raise TrainError(f"{run_dir} holds checkpoint {Path(checkpoint).name}; pass resume=True (or None) to "
                             "continue it, or overwrite=True to delete it and start again")
        return "resume", f"resuming from {checkpoint}"
    return "train", f"no run in {run_dir} yet: training from step 0"


def _changed_since(recipe: dict[str, Any], run_dir: Path, meta: dict[str, Any]) -> list[str]:
    """What differs between a finished run and this recipe: top-level recipe sections, the mixture's
    content, and (stage 2) the stage-1 adapter it started from."""
    saved = run_dir / "recipe.resolved.yaml"
    previous = _comparable(config.load_yaml(saved)) if saved.exists() else {}
    now = _comparable(recipe)
    changed = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
    manifest = resolve(get(recipe, "data.mixture_dir")) / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("content_hash") != meta.get("data", {}).get("content_hash"):
        changed.append("the mixture's content")
    if recipe.get("stage") == 2 and recipe.get("init") != "base":
        adapter = resolve(get(recipe, "from_stage1")) / "adapter_model.safetensors"
        if adapter.exists() and _sha256(adapter) != meta.get("from_stage1_adapter_sha256"):
            changed.append("the stage-1 run")
    return changed


def train_or_resume(recipe: dict[str, Any], resume: bool | None = None, overwrite: bool = False,
                    say=print) -> Path:
    """Train, resume, keep or overwrite as plan_run decides, and say which (the notebooks' entry point)."""
    action, sentence = plan_run(recipe, resume, overwrite)
    say(f"[{get(recipe, 'run_name', 'run')}] {sentence}")
    run_dir = resolve(get(recipe, "output_dir"))
    if action == "keep":
        return run_dir
    return train(recipe, resume=action == "resume", overwrite=action == "overwrite")


def find_last_checkpoint(ckpt_dir: Path) -> str | None:
    """The highest checkpoint-N folder that finished saving (has trainer_state.json), or None."""
    if not Path(ckpt_dir).is_dir():
        return None
    done = [p for p in Path(ckpt_dir).glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return str(max(done, key=_step_of)) if done else None


def _step_of(checkpoint) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0




def _device_name() -> str:
    from medlib.models import cuda_available

    if cuda_available():
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


# ------------------------------------------------------------------------------------------ load / use


def load_trained_model(run_dir: str | os.PathLike, load_in_4bit: bool = False):
    """(model, tokenizer) of a finished run: its recipe's base model + the run's adapter, in eval mode."""
    from medlib.models import load_for_inference

    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    return load_for_inference(meta["base_model"], adapter=run_dir, load_in_4bit=load_in_4bit)


# -------------------------------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    from medlib.cli import add_common_args

    parser = subparsers.add_parser("train", help="two-stage QLoRA training (stage 1 Med-Mix, stage 2 Med-Nirvana)",
                                   description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", type=int, choices=STAGES, help="the profile's stage1.yaml or stage2.yaml")
    which.add_argument("--recipe", default=None, metavar="NAME",
                       help="another recipe of the profile, e.g. chatdoctor or llama3_chatbot (single-stage)")
    add_common_args(parser)
    parser.add_argument("--from", dest="from_dir", default=None,
                        help="stage-1 run folder for stage 2 (default: the recipe's from_stage1)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="upload adapter + model card to this Hub repo (token from $HF_TOKEN)")
    parser.set_defaults(func=main)


def main(args) -> int:
    from medlib.cli import CLIError

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.recipe:
        recipe = config.load_recipe(args.profile, args.recipe, overrides)
        _check_recipe(recipe)
    else:
        recipe = load_recipe_for(args.stage, args.profile, overrides)
    if args.push_to_hub and not os.environ.get("HF_TOKEN"):
        raise CLIError("--push-to-hub needs a token in the HF_TOKEN environment variable (checked before training)")
    try:
        run_dir = train(recipe, out_dir=args.out, from_dir=args.from_dir, resume=args.resume, overwrite=args.overwrite)
    except TrainError as exc:
        raise CLIError(str(exc)) from None
    print(run_dir)
    if args.push_to_hub:
        from medlib.training.card import PushError, push_to_hub

        try:
            print(push_to_hub(run_dir, args.push_to_hub))
        except PushError as exc:
            raise CLIError(str(exc)) from None
    return 0
