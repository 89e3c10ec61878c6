"""Model card and `--push-to-hub` for a finished run. The token comes only from $HF_TOKEN."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from medlib.config import load_resolved
from medlib.training.metadata import RunRecord

DISCLAIMER = (
    "**Medical disclaimer.** This model is a research artefact. It is not a medical device, has not "
    "been clinically validated, can produce confident but wrong or harmful answers, and must not be "
    "used for diagnosis, treatment or any decision about a person's health. Consult a qualified clinician."
)


class PushError(RuntimeError):
    """Uploading failed (no token, offline, Hub error); the message says why."""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def eval_results(run_dir: Path) -> dict[str, Any] | None:
    """Evaluation results written next to the run (eval_results.json), if any."""
    return _read_json(Path(run_dir) / "eval_results.json")


def model_card(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    run = RunRecord.read(run_dir)
    meta = run.metadata
    recipe = load_resolved(run_dir / "recipe.resolved.yaml")
    single_stage = not recipe.uses_stage1
    data = meta.get("data", {})
    t = recipe.training
    hyper = {"learning_rate": t.learning_rate, "weight_decay": t.weight_decay,
             "per_device_train_batch_size": t.per_device_train_batch_size,
             "gradient_accumulation_steps": t.gradient_accumulation_steps, "warmup_steps": t.warmup_steps,
             "num_train_epochs": t.num_train_epochs, "max_steps": t.max_steps, "optim": t.optim,
             "lr_scheduler_type": t.lr_scheduler_type}
    hyper.update({f"lora_{k}": v for k, v in recipe.lora.to_dict().items()})
    hyper["max_seq_length"] = recipe.model.max_seq_length
    adapter = run.adapter or {}
    lines = [
        "---",
        yaml.safe_dump({"base_model": run.base_model, "library_name": "peft",
                        "tags": ["medical", "qlora", "lora", "medlib"], "license": "other"}, sort_keys=False).strip(),
        "---",
        f"# {run.display_name} ({'single stage' if single_stage else 'stage ' + str(recipe.stage)}, profile `{recipe.profile}`)",
        "",
        (f"LoRA adapter trained with medlib (single-stage QLoRA on dialogues, from the base model) on the "
         f"**{recipe.profile}** profile. {recipe.about}".strip() if single_stage else
         f"LoRA adapter trained with medlib (two-stage QLoRA after Athukoralage & Atapattu, 2024) on the "
         f"**{recipe.profile}** profile."),
        "",
        f"Profile: {recipe.note}.",
        "",
        "## Base model",
        f"- `{run.base_model}` (backend: {meta.get('backend')})",
    ]
    if adapter:
        lines.append(f"- what ships: {adapter['description']}")
    if recipe.uses_stage1:
        lines.append(f"- starts from the stage-1 run `{meta.get('from_stage1')}` (handoff: {recipe.handoff})")
    against = run.trained_against
    lines.append(f"- the adapter sits on `{against['model']}`{' in NF4 (4-bit)' if run.weights_in_4bit else ''}: "
                 "load exactly that, plus this adapter, for the model that trained")
    lines += ["", "## Training data"]
    lines.append(f"- mixture: `{data.get('mixture_dir')}` (manifest sha256 {data.get('manifest_sha256')})")
    for split in ("train", "validation"):
        rep = data.get(split, {})
        if rep:
            lines.append(f"- {split}: {rep.get('records')} records, {rep.get('kept')} used, "
                         f"{rep.get('truncated')} truncated, {rep.get('tokens')} tokens")
    for source, count in (data.get("sources") or {}).items():
        lines.append(f"  - {source}: {count}")
    lines += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]
    lines += ["", f"Steps: {meta.get('global_step')}; tokens seen: {meta.get('tokens_seen')}; "
                  f"wall time: {meta.get('wall_time_s')} s; seed: {meta.get('seed')}."]
    results = eval_results(run_dir)
    lines += ["", "## Evaluation"]
    if results:
        lines += ["```json", json.dumps(results, indent=2), "```"]
    else:
        lines.append("No evaluation results were recorded with this run (run `medlib eval`).")
    lines += [
        "",
        "## Intended use",
        "Research on domain adaptation of conversational LLMs to medicine: benchmarking, ablations, teaching.",
        "",
        "## Limitations",
        "- Trained on multiple-choice exam questions and synthetic or scraped doctor-patient dialogues; "
        "exam accuracy does not imply clinical competence.",
        "- Inherits the biases and errors of the base model and of the training sets; English only.",
        "- Not evaluated for safety, calibration or harmful advice.",
        "",
        DISCLAIMER,
        "",
    ]
    return "\n".join(lines)


def push_to_hub(run_dir: Path, repo_id: str, private: bool = True) -> str:
    """Upload the adapter, tokenizer and card of a run. Returns the repo URL."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PushError("--push-to-hub needs a Hugging Face token in the HF_TOKEN environment variable")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PushError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE=1 (offline); unset it on a machine with network")
    run_dir = Path(run_dir)
    (run_dir / "README.md").write_text(model_card(run_dir))
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)  # passed in memory only; never written to disk or logs
        api.create_repo(repo_id, private=private, exist_ok=True)
        allow = ["README.md", "adapter_model.safetensors", "adapter_config.json", "tokenizer*", "special_tokens_map.json",
                 "chat_template.jinja", "vocab.json", "merges.txt", "run_metadata.json", "recipe.resolved.yaml",
                 "log_history.csv", "eval_results.json"]
        api.upload_folder(folder_path=str(run_dir), repo_id=repo_id, allow_patterns=allow)
    except Exception as exc:  # network down, bad token, no permission: one clear message
        raise PushError(f"pushing {run_dir} to the Hub repo {repo_id!r} failed ({type(exc).__name__}: {exc}); "
                        "check the network and that HF_TOKEN may write to that repo") from None
    return f"https://huggingface.co/{repo_id}"
