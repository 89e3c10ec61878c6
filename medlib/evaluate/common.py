"""Shared by MCQ and BERTScore evaluation: the eval recipe, model loading, run labels, file output."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from medlib.config import get, load_recipe
from medlib.paths import resolve
from medlib.prompts import SYSTEM_PROMPT

log = logging.getLogger(__name__)

# Display names of the paper's models, keyed by the run folder names the training recipes use.
DISPLAY_NAMES = {"base": "Base", "med-mix": "Med-Mix", "med-nirvana": "Med-Nirvana"}
ROW_ORDER = ("base", "med-mix", "med-nirvana")


def eval_recipe(profile: str = "local", overrides: Iterable[str] = (), model: str | None = None,
                data_dir: str | None = None, out: str | None = None) -> dict[str, Any]:
    """medlib/recipes/<profile>/eval.yaml with overrides and the CLI's --model/--data-dir/--out applied."""
    recipe = load_recipe(profile, "eval", list(overrides))
    if model:
        recipe["model"]["name"] = model
    if data_dir:
        recipe["data"]["data_dir"] = data_dir
    if out:
        recipe["output_dir"] = out
    return recipe


def system_prompt_of(recipe: dict[str, Any]) -> str | None:
    """The training prompt: `system_prompt: null` (or empty) means medlib's SYSTEM_PROMPT, as in medlib.train."""
    return get(recipe, "prompt.system_prompt", None) or SYSTEM_PROMPT


def data_dir_of(recipe: dict[str, Any]) -> Path | None:
    value = get(recipe, "data.data_dir", None)
    return resolve(value) if value else None


@dataclass
class EvalRun:
    """What one evaluation run resolves from its recipe and arguments before it touches a model."""

    recipe: dict[str, Any]
    model_name: str
    load_in_4bit: bool
    dtype: str
    label: str
    output_dir: Path
    kind: str
    data_dir: Path | None

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.kind / self.label

    def model(self, adapter: Any, loaded: tuple[Any, Any] | None = None) -> tuple[Any, Any, list[Path]]:
        """(model, tokenizer, adapter chain): `loaded` is reused as is (the notebooks load once), else load."""
        if loaded is not None:
            lm, tokenizer = loaded
            chain = adapter_chain(adapter)
        else:
            lm, tokenizer, chain = load_model(self.model_name, adapter, load_in_4bit=self.load_in_4bit, dtype=self.dtype)
        prepare_tokenizer(tokenizer)
        return lm, tokenizer, chain


def eval_run(recipe: dict[str, Any], kind: str, adapter: Any, label: str | None,
             load_in_4bit: bool | None, dtype: str | None) -> EvalRun:
    """Resolve model, precision, label and output folder (<output_dir>/<kind>/<label>); arguments beat the recipe."""
    label = run_label(adapter, label)
    return EvalRun(
        recipe=recipe, model_name=get(recipe, "model.name"),
        load_in_4bit=bool(get(recipe, "model.load_in_4bit")) if load_in_4bit is None else load_in_4bit,
        dtype=resolve_dtype(get(recipe, "model.dtype", "float32") if dtype is None else dtype),
        label=label, output_dir=resolve(get(recipe, "output_dir")), kind=kind, data_dir=data_dir_of(recipe))


def adapter_chain(adapter: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """An adapter argument as a list of folders: None -> [], one folder -> [it], a list -> as given.

    A training run folder holds one self-contained adapter on the original base (medlib.train folds
    stage 1 into the stage-2 adapter), so one folder is the usual case. A list is applied in order:
    every adapter but the last is merged into the base weights first.
    """
    if adapter is None or adapter == "" or adapter == []:
        return []
    if isinstance(adapter, (str, Path)):
        return [resolve(adapter)]
    return [resolve(a) for a in adapter]


def adapter_base(folder: Path) -> str | None:
    """The base model an adapter was trained on, from the training run's metadata or the adapter config."""
    for name, key in (("run_metadata.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            return json.loads((folder / name).read_text())[key]
        except (OSError, KeyError, json.JSONDecodeError):
            continue
    return None


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls run natively (about 2.5x float32 on this project's CPU); elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def resolve_dtype(name: str | None) -> str:
    """Eval recipe's model.dtype: auto -> the GPU's training precision (bfloat16 from compute capability 8.0,
    float16 below), bfloat16 on a CPU with native bf16, float32 otherwise."""
    from medlib.models import cuda_available, training_precision

    name = name or "auto"
    if name == "auto":
        if cuda_available():
            return {"bf16": "bfloat16", "fp16": "float16"}[training_precision("auto")[0]]
        return "bfloat16" if cpu_has_fast_bf16() else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.dtype {name!r} must be auto, float32, bfloat16 or float16")
    return name


def load_model(model_name: str, adapter: Any = None, load_in_4bit: bool = False, dtype: str | None = "float32"):
    """(model, tokenizer, adapters) for evaluation in eval mode: base model (+ adapters merged in order, the last kept as LoRA)."""
    import torch

    from medlib.models import ModelNotFoundError, load_hf_model, load_tokenizer

    chain = adapter_chain(adapter)
    for folder in chain:
        if not (folder / "adapter_config.json").exists():
            raise ModelNotFoundError(f"adapter folder {folder} has no adapter_config.json (has the training run finished?)")
        trained_on = adapter_base(folder)
        if trained_on and trained_on != model_name:
            log.warning("adapter %s was trained on %r but is being evaluated on %r", folder, trained_on, model_name)
    torch_dtype = getattr(torch, resolve_dtype(dtype))
    tokenizer = load_tokenizer(model_name)
    model = load_hf_model(model_name, load_in_4bit=load_in_4bit, dtype=torch_dtype)
    if chain:
        from peft import PeftModel

        for folder in chain[:-1]:
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        model = PeftModel.from_pretrained(model, str(chain[-1]))
        if not load_in_4bit:
            model = model.to(torch_dtype)  # peft keeps adapter weights in float32; one dtype throughout is faster
    model.eval()
    return model, tokenizer, chain


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding, so the last position of every row is the answer position (batched scoring and generation)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_label(adapter: Any, label: str | None = None) -> str:
    if label:
        return label
    chain = adapter_chain(adapter)
    return chain[-1].name if chain else "base"


def display_name(label: str) -> str:
    return DISPLAY_NAMES.get(label, label)


def row_sort_key(label: str) -> tuple[int, str]:
    return (ROW_ORDER.index(label) if label in ROW_ORDER else len(ROW_ORDER), label)


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


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def sample_limit(records: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """A fixed random subset of `limit` records (same for every model), kept in file order."""
    if not limit or limit >= len(records):
        return records
    import random

    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]
