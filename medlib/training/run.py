"""One training run, read top to bottom: data -> model -> trainer -> train -> save -> exports -> record.

    run_dir = train(recipe, run_dir, mixture_dir, stage1_run=None)

`recipe` is a typed `medlib.config.TrainRecipe`; the folders come from `medlib.pipeline.Layout`
(or the CLI's --out / --from). The mixture must be built (medlib.data.mixtures.build_mixture).

Stage 2 starts from stage 1 as `handoff:` says (medlib/training/handoff.py): `requantized_merge` (the
authors') trains a fresh adapter on the stage-1 run's merged 16-bit model reloaded in 4-bit and ships
that adapter on that model; `stacked` keeps the stage-1 LoRA frozen on the original 4-bit base beside a
fresh one and ships both as one adapter of rank r1 + r2; `continue` keeps training the stage-1 adapter.
`from_base` trains one dialogue stage from the base model (the seeds' single-stage chatbots, recipes
`chatdoctor` and `llama3_chatbot`). Every run records the weights its adapter trained against
(run_metadata.json -> trained_against), and evaluation, chat, serve and export load exactly those.
Every stage-1 run measures what the authors' handoff would keep of it (run_metadata.json -> handoff_measure).

A run folder is the contract for everything downstream: adapter_model.safetensors + adapter_config.json
+ tokenizer, recipe.resolved.yaml, run_metadata.json (system prompt, chat template, target format,
LoRA rank actually shipped, backend, precision, data), log_history.json/.csv, checkpoints/ for resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from medlib.config import TrainRecipe, load_resolved
from medlib.data.io import file_sha256
from medlib.data.mixtures import ensure_mixture, read_mixture, seeded_subset
from medlib.models import name_adapter_base, resolve_available_model
from medlib.prompts import effective_system_prompt
from medlib.paths import resolve
from medlib.runs import MERGED_RECORD, Layout, ensure_merged
from medlib.training import handoff as handoffs
from medlib.training import metadata
from medlib.training.adapters import combine_adapters
from medlib.training.arguments import sft_config, trainer_settings
from medlib.training.backends import export_gguf, lm_head_on_labelled_positions, load_for_training, select_backend
from medlib.training.checkpoints import find_last_checkpoint, step_of
from medlib.training.tokenize import pack_constant_length, tokenize_records

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """A run cannot start or go on; the message names the file or setting."""


def train(recipe: TrainRecipe, run_dir: str | Path, mixture_dir: str | Path, stage1_run: str | Path | None = None,
          resume: bool = False, overwrite: bool = False, callbacks: Sequence[Any] = ()) -> Path:
    """Train one run as the recipe says; returns the run folder (see the module docstring)."""
    started = time.time()
    run_dir, mixture_dir = Path(run_dir), Path(mixture_dir)
    stage1 = _check_inputs(recipe, run_dir, stage1_run, resume, overwrite)
    base_path = resolve_available_model(recipe.model.name)
    # Backend before any transformers import: unsloth must be imported first to patch transformers/TRL.
    backend, fallbacks = select_backend(recipe.model.backend)

    # data
    train_records, eval_records, manifest = read_mixture(mixture_dir)
    _check_resume_data(run_dir, manifest, resume)
    _prepare_run_dir(run_dir, stage1, resume, overwrite)

    # model
    settings, precision = trainer_settings(recipe, backend, fallbacks)
    from transformers import set_seed

    set_seed(recipe.seed)
    start = _starting_point(recipe, run_dir, base_path, stage1, backend)
    model, tokenizer = load_for_training(recipe, backend, start["train_from"], start["continue_adapter"],
                                         settings["gradient_checkpointing"], precision["mode"], start["frozen_adapter"])

    # trainer
    system_prompt = effective_system_prompt(recipe.prompt.system_prompt)
    train_rows, train_report = _tokenized(tokenizer, train_records, recipe, recipe.training.max_train_samples,
                                          system_prompt, "train")
    eval_rows, eval_report = _tokenized(tokenizer, eval_records, recipe, recipe.training.max_eval_samples,
                                        system_prompt, "validation")
    if not train_rows:
        raise TrainError(f"no training record of {mixture_dir} fits in {recipe.model.max_seq_length} tokens with its answer")
    if not eval_rows:
        fallbacks.append("validation split is empty (or max_eval_samples=0): no periodic validation loss")
    args = sft_config(settings, run_dir / "checkpoints", has_validation=bool(eval_rows))
    trainer = _trainer(model, tokenizer, args, train_rows, eval_rows, callbacks)
    if not args.bf16:
        _keep_lora_float32(trainer, precision["mode"], fallbacks)

    # record what is about to run, before it runs (a crash leaves status "running")
    meta = metadata.run_metadata(recipe, base_path, backend, fallbacks, stage1, manifest, train_report, eval_report,
                                 precision, system_prompt, tokenizer, settings)
    resume_from = find_last_checkpoint(run_dir / "checkpoints") if resume else None
    meta["resumed_from"] = resume_from
    meta["trained_against"] = start["trained_against"]

    # train
    with lm_head_on_labelled_positions() as labelled_only:
        if backend == "hf":  # unsloth computes its own loss
            meta["lm_head_positions"] = "labelled only" if labelled_only else "all (this TRL's default off CUDA)"
        metadata.write_run_files(recipe, run_dir, meta)
        train_started = time.time()
        try:
            result = trainer.train(resume_from_checkpoint=resume_from)
        finally:
            metadata.write_log_history(trainer.state.log_history, run_dir)
        train_seconds = time.time() - train_started

    # save
    meta["adapter"] = _save_adapter(recipe, trainer, tokenizer, run_dir, stage1, start["trained_against"])

    # what the authors' handoff would keep of this stage (every stage-1 run)
    if recipe.stage == 1:
        meta["handoff_measure"] = handoffs.measure_stage1(trainer, precision["mode"])

    # exports
    exports = _exports(recipe, trainer, tokenizer, backend, run_dir)

    # record how it went
    steps_run = max(1, trainer.state.global_step - step_of(resume_from))
    meta.update({
        "status": "finished", "global_step": trainer.state.global_step,
        "train_loss": getattr(result, "training_loss", None),
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "wall_time_s": round(time.time() - started, 1), "train_time_s": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / steps_run, 3),
        "memory": metadata.peak_memory(), "exports": exports,
    })
    metadata.write_metadata(run_dir, meta)
    log.info("finished: %s (%d steps, %.0f s)", run_dir, trainer.state.global_step, meta["wall_time_s"])
    return run_dir


# ------------------------------------------------------------------------------------------- phases


def _check_inputs(recipe: TrainRecipe, run_dir: Path, stage1_run: str | Path | None, resume: bool,
                  overwrite: bool) -> Path | None:
    """Cheap checks first: nothing heavy is loaded before every input is known to exist. Returns the stage-1 run."""
    if recipe.training.max_steps == 0:
        raise TrainError(f"{recipe.meta.recipe_file}: training.max_steps is 0: nothing to train (-1 means one full epoch)")
    if recipe.stage == 2 and recipe.handoff is None:
        raise TrainError(f"{recipe.meta.recipe_file}: a stage-2 recipe needs handoff: requantized_merge, stacked, "
                         "continue or from_base")
    last_checkpoint = find_last_checkpoint(run_dir / "checkpoints")
    if resume and last_checkpoint is None:
        log.warning("--resume: no checkpoint in %s; starting from step 0", run_dir / "checkpoints")
    if not resume and not overwrite and (last_checkpoint or (run_dir / "adapter_config.json").exists()):
        raise TrainError(f"{run_dir} already holds a run; use --resume to continue it, --overwrite to replace it, "
                         "or --out for a new folder")
    if not recipe.uses_stage1:
        return None
    if stage1_run is None:
        raise TrainError(f"{recipe.meta.recipe_file}: stage 2 (handoff: {recipe.handoff}) needs the stage-1 run folder")
    stage1 = Path(stage1_run)
    if not (stage1 / "adapter_config.json").exists():
        raise TrainError(f"stage 2 needs a finished stage-1 run: {stage1} has no adapter_config.json "
                         "(run `medlib train --stage 1` first, or pass --from DIR)")
    trained_on = metadata.run_base_model(stage1)
    if trained_on != recipe.model.name:
        raise TrainError(f"stage-1 run {stage1} was trained on {trained_on!r}, "
                         f"but this recipe's model.name is {recipe.model.name!r}")
    return stage1


def _check_resume_data(run_dir: Path, manifest: dict[str, Any], resume: bool) -> None:
    meta_file = run_dir / "run_metadata.json"
    if resume and find_last_checkpoint(run_dir / "checkpoints") and meta_file.exists():
        previous = json.loads(meta_file.read_text())
        if previous.get("data", {}).get("manifest_sha256") not in (None, manifest["manifest_sha256"]):
            raise TrainError(f"cannot resume {run_dir}: the mixture {manifest['mixture_dir']} changed since the run "
                             "started (manifest hash differs)")


def _prepare_run_dir(run_dir: Path, stage1: Path | None, resume: bool, overwrite: bool) -> None:
    if overwrite and not resume and run_dir.exists():
        if any(run_dir.iterdir()) and not ((run_dir / "run_metadata.json").exists() or (run_dir / "checkpoints").exists()):
            raise TrainError(f"--overwrite: {run_dir} is not a medlib run folder; refusing to delete it")
        if stage1 is not None and stage1.resolve() == run_dir.resolve():
            raise TrainError(f"--overwrite: {run_dir} is the stage-1 run this stage starts from")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _tokenized(tokenizer: Any, records: list[dict], recipe: TrainRecipe, limit: int | None, system_prompt: str,
               split: str) -> tuple[list[dict], Any]:
    records = seeded_subset(records, limit, recipe.seed)
    max_len = recipe.model.max_seq_length
    if recipe.training.packing and recipe.training.packing_strategy == "constant_length":
        rows, report = pack_constant_length(tokenizer, records, max_len, recipe.seed, system_prompt,
                                            recipe.prompt.target_style, recipe.prompt.mcq_format)
        log.info("%s: %d records packed into %d rows of %d tokens (%d tokens of partial rows dropped)", split,
                 report.records, report.rows, max_len, report.tokens_dropped)
        return rows, report
    rows, report = tokenize_records(tokenizer, records, max_len, system_prompt, recipe.prompt.target_style,
                                    recipe.prompt.mcq_format, recipe.training.loss_on)
    if report.cut_to_fit:
        log.info("%s: cut to fit %d tokens, answer kept: %s", split, max_len,
                 ", ".join(f"{n} by the start of their {what}" for what, n in report.cut_to_fit.items()))
    if report.truncated or report.dropped_no_target:
        log.warning("%s: %d records longer than %d tokens were truncated; %d lost their whole answer and were "
                    "dropped (ids in run_metadata.json)", split, report.truncated, max_len, len(report.dropped_no_target))
    return rows, report


def _trainer(model: Any, tokenizer: Any, args: Any, train_rows: list[dict], eval_rows: list[dict],
             callbacks: Sequence[Any]) -> Any:
    from datasets import Dataset
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, callbacks=list(callbacks))


def _keep_lora_float32(trainer: Any, precision: str, fallbacks: list[str]) -> None:
    """TRL casts a quantised model's LoRA weights to bf16 (the QLoRA paper's choice on GPU). Without bf16
    (CPU: slow and lossy; fp16 on a T4: the grad scaler needs float32 weights) they stay in float32."""
    import torch

    cast = [p for p in trainer.model.parameters() if p.requires_grad and p.dtype == torch.bfloat16]
    for param in cast:
        param.data = param.data.float()
    if cast:
        fallbacks.append(f"LoRA weights kept in float32 (precision {precision}, no bf16)")


def _starting_point(recipe: TrainRecipe, run_dir: Path, base_path: str, stage1: Path | None,
                    backend: str) -> dict[str, Any]:
    """What this run's model is built from: the weights to load, an adapter to continue or keep frozen, and
    the `trained_against` record (the weights the shipped adapter sits on, and whether they are 4-bit)."""
    start: dict[str, Any] = {"train_from": base_path, "continue_adapter": None, "frozen_adapter": None,
                             "trained_against": {"model": recipe.model.name, "in_4bit": recipe.model.load_in_4bit}}
    if not recipe.uses_stage1:
        return start
    start["trained_against"] = dict(metadata.RunRecord.read(stage1).trained_against)
    if recipe.handoff == "continue":
        start["continue_adapter"] = stage1
    elif recipe.handoff == "stacked":
        if backend == "unsloth":
            raise TrainError(f"{recipe.meta.recipe_file}: handoff stacked trains a frozen and a fresh LoRA together, "
                             "which the unsloth backend does not do; use --set model.backend=hf, or handoff "
                             "requantized_merge / continue")
        start["frozen_adapter"] = stage1
    elif recipe.handoff == "requantized_merge":
        merged = ensure_merged(stage1, backend)
        start["train_from"] = str(merged)
        start["trained_against"] = {"model": os.path.relpath(merged, run_dir), "in_4bit": recipe.model.load_in_4bit,
                                    "merged_from": json.loads((merged / MERGED_RECORD).read_text())}
    else:
        raise TrainError(f"{recipe.meta.recipe_file}: unknown handoff {recipe.handoff!r}")
    return start


def _save_adapter(recipe: TrainRecipe, trainer: Any, tokenizer: Any, run_dir: Path, stage1: Path | None,
                  trained_against: dict[str, Any]) -> dict[str, Any]:
    """Final adapter + tokenizer at the top of the run folder; returns what shipped (rank, combined or not).
    Under `stacked` the fresh adapter is saved aside and the shipped one joins it to the frozen stage-1
    LoRA: W' + ΔW1 + ΔW2 on the original base, exactly the model that trained."""
    if recipe.uses_stage1 and recipe.handoff == "stacked":
        stage2_only = run_dir / "stage2_adapter"
        trainer.model.save_pretrained(str(stage2_only), safe_serialization=True, selected_adapters=["default"])
        combine_adapters(stage1, stage2_only, run_dir, recipe.model.name)
    else:
        trainer.model.save_pretrained(str(run_dir), safe_serialization=True, selected_adapters=["default"])
    name_adapter_base(run_dir, trained_against["model"])
    tokenizer.save_pretrained(str(run_dir))
    return metadata.shipped_adapter(run_dir, recipe)


def _exports(recipe: TrainRecipe, trainer: Any, tokenizer: Any, backend: str, run_dir: Path) -> dict[str, str]:
    exports = {}
    if recipe.training.export_merged_16bit:
        exports["merged_16bit"] = str(ensure_merged(run_dir, backend))
    if recipe.training.export_gguf:
        exports["gguf"] = str(export_gguf(trainer.model, tokenizer, backend, run_dir / "gguf", recipe.training.export_gguf))
    return exports


# ----------------------------------------------------------------------------------- (re)run planning


def plan_run(recipe: TrainRecipe, run_dir: str | Path, mixture_dir: str | Path, stage1_run: str | Path | None = None,
             resume: bool | None = None, overwrite: bool = False) -> tuple[str, str]:
    """What a notebook's (re)run of this stage does, as (action, sentence); nothing is deleted unless overwrite.

    action is one of:
      "train"     no run here yet;
      "resume"    a checkpoint exists and resume is None (the default) or True: continue from it;
      "keep"      a finished run with exactly these settings exists: keep it, train nothing;
      "overwrite" overwrite=True: replace whatever is there (checkpoints included).
    A checkpoint with resume=False, or a finished run with other settings, is a TrainError that
    names the choice to make; a Colab disconnect therefore never costs the checkpoints.
    """
    run_dir = Path(run_dir)
    checkpoint = find_last_checkpoint(run_dir / "checkpoints")
    meta_file = run_dir / "run_metadata.json"
    finished = meta_file.exists() and json.loads(meta_file.read_text()).get("status") == "finished"
    if overwrite:
        if checkpoint or finished or (run_dir / "adapter_config.json").exists():
            return "overwrite", f"overwrite=True: deleting the run in {run_dir} (checkpoints included) and training anew"
        return "train", f"overwrite=True, but {run_dir} holds no run yet: training from step 0"
    if finished:
        changed = _changed_since(recipe, run_dir, Path(mixture_dir), stage1_run, json.loads(meta_file.read_text()))
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


def _changed_since(recipe: TrainRecipe, run_dir: Path, mixture_dir: Path, stage1_run: str | Path | None,
                   meta: dict[str, Any]) -> list[str]:
    """What differs between a finished run and this recipe: top-level recipe sections, the mixture's
    content, and (stage 2) the stage-1 adapter it started from."""
    saved = run_dir / "recipe.resolved.yaml"
    try:
        previous = load_resolved(saved).to_dict() if saved.exists() else {}
    except ValueError as exc:  # written by an older medlib, or edited by hand: not comparable
        return [f"its recipe ({exc}; written by another medlib version or edited)"]
    now = recipe.to_dict()
    changed = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
    manifest = mixture_dir / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("content_hash") != meta.get("data", {}).get("content_hash"):
        changed.append("the mixture's content")
    if recipe.uses_stage1 and stage1_run is not None:
        adapter = Path(stage1_run) / "adapter_model.safetensors"
        if adapter.exists() and file_sha256(adapter) != meta.get("from_stage1_adapter_sha256"):
            changed.append("the stage-1 run")
    return changed


def train_or_resume(recipe: TrainRecipe, run_dir: str | Path, mixture_dir: str | Path,
                    stage1_run: str | Path | None = None, resume: bool | None = None, overwrite: bool = False,
                    say=print) -> Path:
    """Train, resume, keep or overwrite as plan_run decides, and say which (the notebooks' entry point)."""
    action, sentence = plan_run(recipe, run_dir, mixture_dir, stage1_run, resume, overwrite)
    say(f"[{recipe.run_name}] {sentence}")
    if action == "keep":
        return Path(run_dir)
    return train(recipe, run_dir, mixture_dir, stage1_run, resume=action == "resume", overwrite=action == "overwrite")


def train_run(recipe: TrainRecipe, lay: Layout, resume: bool | None = None, overwrite: bool = False,
              stage1_run: str | Path | None = None, run_dir: str | Path | None = None, plan: bool = True) -> Path:
    """Train any training recipe inside the layout: its mixture (built when missing), its run folder,
    and for stage 2 the stage-1 run it names (from_run), unless stage1_run / run_dir say otherwise.
    plan=True (notebooks): resume, keep or refuse as medlib.training.plan_run decides and says;
    plan=False (the CLI): train now, an existing run being an error unless resume or overwrite."""
    mixture = ensure_mixture(recipe, lay)
    if recipe.uses_stage1 and stage1_run is None:
        stage1_run = lay.run(recipe.from_run) if recipe.from_run else None
    run_dir = resolve(run_dir) if run_dir else lay.run(recipe.run_name)
    if plan:
        return train_or_resume(recipe, run_dir, mixture, stage1_run, resume, overwrite)
    return train(recipe, run_dir, mixture, stage1_run, resume=bool(resume), overwrite=overwrite)
