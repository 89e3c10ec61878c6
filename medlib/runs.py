"""The floor every step stands on: where a profile's runs write (Layout), which recipes a profile's stages
use, and the run folder, the contract between training and everything after it.

Nothing here imports a step (data building, training, evaluation, chat, report); every step imports this.

A training run folder holds an adapter (adapter_model.safetensors + adapter_config.json), the tokenizer it
trained with, recipe.resolved.yaml and run_metadata.json. Evaluation, the chatbot, `medlib serve` and
`medlib export` read a run through `RunRecord` and load it with `load_run`, never through the recipe that
made it. `trained_against` says which weights the adapter trained against; `load_run` loads exactly those
plus the adapter (the model that trained), or (weights="requantized_merge") the run merged in 16-bit and
reloaded in 4-bit, as the paper's authors evaluated and published their models.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from medlib import config
from medlib.config import TrainRecipe
from medlib.data.io import file_sha256
from medlib.models import dequantize_exactly, load_for_inference, load_hf_model, load_tokenizer
from medlib.paths import outputs_dir, resolve

log = logging.getLogger(__name__)

METADATA_FILE = "run_metadata.json"
MERGED_DIR = "merged_16bit"          # the merged 16-bit model inside a run folder (the authors' published form)
MERGED_RECORD = "merged_from.json"   # which adapter and base a merged folder was made from
NF4_BLOCKSIZE = 64                   # bitsandbytes' default, and the Hub's -bnb-4bit checkpoints'
Weights = Literal["as_trained", "requantized_merge"]


# --------------------------------------------------------------------------------- where runs write

@dataclass(frozen=True)
class Layout:
    """Where a profile's runs write, derived from the output root and the recipes' names."""
    profile: str
    root: Path

    def mixture(self, name: str) -> Path:
        return self.root / "data" / name

    def run(self, name: str) -> Path:
        return self.root / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def chat(self) -> Path:
        return self.root / "chat"

    def study(self, name: str = "dmt") -> Path:
        return self.root / "study" / name

    @property
    def report(self) -> Path:
        return self.root / "REPORT.md"

    def export(self, name: str) -> Path:
        return self.root / "export" / name


def layout(profile: str = "local", out_dir: str | Path | None = None) -> Layout:
    return Layout(profile, resolve(out_dir) if out_dir else outputs_dir() / profile)


def with_data_dir(recipe: Any, data_dir: str | Path | None) -> Any:
    """The recipe reading its published files from data_dir (None: unchanged)."""
    return recipe if data_dir is None else recipe.replace(data=recipe.data.replace(data_dir=str(data_dir)))


def stage_recipes(profile: str, data_dir: str | None = None, preset: str | None = None,
                  overrides: Iterable[str] = ()) -> dict[int, TrainRecipe]:
    """The profile's stage-1 and stage-2 recipes (a preset and --set overrides applied to both)."""
    return {stage: with_data_dir(config.load_train(profile, stage, overrides, preset), data_dir) for stage in (1, 2)}


def stage1_of(recipe: TrainRecipe) -> TrainRecipe:
    """The stage-1 recipe a stage-2 recipe starts from and replays (its from_run), same data folder."""
    stage1 = config.load_train(recipe.profile, 1)
    if recipe.from_run != stage1.run_name:
        raise config.RecipeError(f"{recipe.meta.recipe_file}: from_run {recipe.from_run!r} is not the profile's stage-1 "
                                 f"run {stage1.run_name!r}; pass the stage-1 run folder (--from) instead")
    return stage1.replace(data=stage1.data.replace(data_dir=recipe.data.data_dir, strict=recipe.data.strict,
                                                   hub=recipe.data.hub, hub_mirror=recipe.data.hub_mirror))


# ------------------------------------------------------------------------------------ the run folder


def merge_dtype(precision: str) -> Any:
    """The dtype a merged 16-bit model is saved in: float16 where training ran in fp16 (a T4), bfloat16
    elsewhere (Unsloth's merged_16bit on the authors' GPU; on a CPU the same, so the local handoff rounds as theirs)."""
    import torch

    return torch.float16 if precision == "fp16" else torch.bfloat16


def run_base_model(run_dir: str | Path) -> str:
    """The base model a run (or any adapter folder) was trained on, as medlib names it."""
    return RunRecord.read(run_dir).base_model


@dataclass(frozen=True)
class RunRecord:
    """What a finished run folder says it is; every field comes from the folder itself.

    `trained_against` is the weights the shipped adapter trained against: {"model": a model name, a Hub id or
    a folder relative to the run (the merged Med-Mix under handoff requantized_merge), "in_4bit": whether
    they were quantised to NF4}. Loading exactly that, plus the adapter, gives the model that trained."""

    folder: Path
    base_model: str
    name: str
    display_name: str
    system_prompt: str | None
    chat_template: str | None
    target_style: str | None
    mcq_format: str | None
    adapter: dict[str, Any] | None
    profile: str | None
    trained_against: dict[str, Any]
    metadata: dict[str, Any]

    @classmethod
    def read(cls, folder: str | Path) -> "RunRecord":
        folder = Path(folder)
        meta_file = folder / METADATA_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        base = meta.get("base_model")
        if base is None:
            config = folder / "adapter_config.json"
            if not config.exists():
                raise FileNotFoundError(f"{folder} is not a run folder: it has neither {METADATA_FILE} nor adapter_config.json")
            base = json.loads(config.read_text())["base_model_name_or_path"]
        # a run written before trained_against was recorded sits on its base, quantised as its recipe said
        trained_against = meta.get("trained_against") or {"model": base, "in_4bit": None}
        return cls(folder=folder, base_model=base, name=meta.get("run_name") or folder.name,
                   display_name=meta.get("display_name") or meta.get("run_name") or folder.name,
                   system_prompt=meta.get("system_prompt"), chat_template=meta.get("chat_template"),
                   target_style=meta.get("target_style"), mcq_format=meta.get("mcq_format"), adapter=meta.get("adapter"),
                   profile=meta.get("profile"), trained_against=trained_against, metadata=meta)

    @property
    def weights_base(self) -> str:
        """The model the shipped adapter sits on: a model name or Hub id, or a folder (resolved from the run folder)."""
        model = self.trained_against["model"]
        local = self.folder / model
        return str(local.resolve()) if not Path(model).is_absolute() and local.exists() else model

    @property
    def weights_in_4bit(self) -> bool:
        """Whether the adapter trained against those weights quantised to NF4 (unknown for old runs: True, QLoRA's)."""
        return self.trained_against.get("in_4bit") is not False


def run_record_of(adapter: Any) -> RunRecord | None:
    """The record of a training run folder (None for the base model or a bare adapter folder)."""
    if adapter is None:
        return None
    folder = Path(adapter)
    return RunRecord.read(folder) if (folder / "adapter_config.json").exists() else None


def load_run(base_model: str, run: str | Path | None = None, load_in_4bit: bool = False, dtype: str | None = None,
             weights: Weights = "as_trained"):
    """(model, tokenizer) for a run folder, or for base_model alone when run is None.

    as_trained: exactly the weights the run's adapter trained against (NF4 when it trained in 4-bit, kept
    in 4-bit when load_in_4bit, else de-quantised exactly to float) plus the adapter: the model that trained.
    requantized_merge: the run merged in 16-bit (<run>/merged_16bit, made once) and reloaded in 4-bit,
    the authors' Med-Mix and Med-Nirvana. The base model alone is read as a pre-quantised checkpoint says
    (NF4) or as load_in_4bit says."""
    record = run_record_of(run)
    if record is None:
        return load_for_inference(base_model, run, load_in_4bit, dtype)
    if weights == "requantized_merge":
        merged = ensure_merged(record.folder)
        return load_for_inference(str(merged), None, load_in_4bit, dtype, base_in_4bit=True)
    return load_for_inference(record.weights_base, record.folder, load_in_4bit, dtype, base_in_4bit=record.weights_in_4bit)


def write_merged(base: str, adapter_dir: Path, target: Path, backend: str, dtype: Any, base_in_4bit: bool,
                 tokenizer_dir: Path | None = None) -> Path:
    """base + adapter merged and saved in 16-bit (`dtype`), as the authors' save_pretrained_merged did:
    the base as the adapter was trained against it (NF4 de-quantised exactly when base_in_4bit), plus ΔW, cast.
    Written to a temporary folder and moved into place, so a half-written merge is never picked up."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged_by = backend
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(adapter_dir), load_in_4bit=base_in_4bit)
        try:
            model.save_pretrained_merged(str(tmp), tokenizer, save_method="merged_16bit")
        except RuntimeError as exc:
            # Unsloth merges into the 16-bit original it maps a Hub -bnb-4bit name to; a local NF4 checkpoint
            # has none, and it refuses. Then merge as the hf backend does, into the NF4 weights de-quantised.
            if "16bit" not in str(exc):
                raise
            log.warning("unsloth refused the 16-bit merge (%s); merging into the de-quantised NF4 base instead", exc)
            del model
            merged_by = "hf (unsloth refused: no 16-bit original of an NF4 base)"
    if merged_by != "unsloth":
        import torch
        from peft import PeftModel

        model = load_hf_model(base, load_in_4bit=base_in_4bit, dtype=torch.float32)
        model = dequantize_exactly(model, torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().to(dtype)
        model.save_pretrained(str(tmp), safe_serialization=True)
        load_tokenizer(str(tokenizer_dir or adapter_dir)).save_pretrained(str(tmp))
    (tmp / MERGED_RECORD).write_text(json.dumps({
        "base": base, "base_in_4bit": base_in_4bit, "dtype": str(dtype).replace("torch.", ""),
        "adapter": str(adapter_dir), "adapter_sha256": file_sha256(Path(adapter_dir) / "adapter_model.safetensors"),
        "backend": merged_by}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def merged_is_current(target: Path, adapter_dir: Path) -> bool:
    """A merged folder exists and was made from this very adapter file."""
    record = Path(target) / MERGED_RECORD
    if not (record.exists() and (Path(target) / "config.json").exists()):
        return False
    return json.loads(record.read_text()).get("adapter_sha256") == file_sha256(Path(adapter_dir) / "adapter_model.safetensors")


def ensure_merged(run: str | Path, backend: str = "hf") -> Path:
    """<run>/merged_16bit: the run's adapter merged into the weights it trained against, in 16-bit (the authors'
    save_pretrained_merged), made once per adapter file and reused."""
    record = RunRecord.read(run)
    target = record.folder / MERGED_DIR
    if merged_is_current(target, record.folder):
        return target
    precision = (record.metadata.get("precision") or {}).get("mode", "fp32")
    log.info("merging %s into %s in 16-bit (%s)", record.folder, record.weights_base, target)
    return write_merged(record.weights_base, record.folder, target, backend, merge_dtype(precision),
                        record.weights_in_4bit, tokenizer_dir=record.folder)
