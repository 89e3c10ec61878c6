"""The training backends: pick one at run time, then load a base model + LoRA adapter on it.

Both backends get the same recipe settings (LoRA r/alpha/targets/rsLoRA, 4-bit NF4, sequence length)
and the same pre-tokenised data; they differ only in how the model is built and saved:
- unsloth: FastLanguageModel.from_pretrained(load_in_4bit, max_seq_length) + get_peft_model with
  use_gradient_checkpointing="unsloth"; Unsloth's save_pretrained_merged / save_pretrained_gguf.
- hf: transformers + bitsandbytes NF4 (double quantisation) + peft; peft's merge_and_unload.
unsloth is imported only inside these functions (it raises at import on a CPU machine).
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from medlib.config import LoraSettings, TrainRecipe
from medlib.models import cuda_available, load_hf_model, load_tokenizer, torch_dtype_for
from medlib.prompts import apply_chat_template_choice

log = logging.getLogger(__name__)


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


@contextmanager
def lm_head_on_labelled_positions() -> Iterator[bool]:
    """While open, TRL's fused LM head projects only the positions that carry a label, on every device.

    TRL does so on CUDA/XPU but scores every position elsewhere, to keep tile shapes fixed for compiled
    backends. Eager CPU training has no such concern, and an MCQ answer labels about 3 of ~240 tokens per
    sample, so scoring every position spent over a fifth of the step's matmul time on logits nothing reads
    (1.5x tokens/s measured, identical losses: benchmarks/README.md, tests/test_train.py). Yields whether
    it applies; a TRL without that switch (another version) trains as it decides, and the run says so."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        yield False
        return
    decides_compact = getattr(trl_utils, "_use_triton", None)
    if decides_compact is None:
        yield False
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or decides_compact(device)
    try:
        yield True
    finally:
        trl_utils._use_triton = decides_compact


def lora_kwargs(lora: LoraSettings) -> dict[str, Any]:
    return {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": lora.bias,
            "use_rslora": lora.use_rslora, "target_modules": list(lora.target_modules)}


def load_for_training(recipe: TrainRecipe, backend: str, model_path: str, continue_adapter: Path | None,
                      gradient_checkpointing: bool, precision: str = "fp32") -> tuple[Any, Any]:
    """(peft model with trainable LoRA, tokenizer). continue_adapter: keep training that adapter.
    precision (medlib.models.training_precision) sets the compute dtype, so the model and the trainer agree."""
    dtype = torch_dtype_for(precision)
    if backend == "unsloth":
        return _load_unsloth(recipe, model_path, continue_adapter, dtype)
    return _load_hf(recipe, model_path, continue_adapter, gradient_checkpointing, dtype)


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


def _load_hf(recipe, model_path, continue_adapter, gradient_checkpointing, dtype):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    tokenizer = apply_chat_template_choice(load_tokenizer(model_path), recipe.prompt.chat_template)
    load_in_4bit = recipe.model.load_in_4bit
    model = load_hf_model(model_path, load_in_4bit=load_in_4bit, dtype=dtype)
    if keep_4bit_cpu_numerics(model):
        log.info("bitsandbytes CPU bf16 repacking of NF4 weights disabled: float32 numerics throughout the run")
    if load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # No KV cache while training: transformers only builds the block-diagonal mask of padding-free /
    # packed batches when no cache is passed, and the validation forward would otherwise create one.
    model.config.use_cache = False
    if continue_adapter is not None:
        model = PeftModel.from_pretrained(model, str(continue_adapter), is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(recipe.lora)))
    return model, tokenizer


def _load_unsloth(recipe, model_path, continue_adapter, dtype):
    from unsloth import FastLanguageModel  # noqa: only here; needs CUDA

    max_seq_length = recipe.model.max_seq_length
    source = str(continue_adapter) if continue_adapter is not None else model_path
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=source, max_seq_length=max_seq_length, dtype=dtype,  # not None: Unsloth's guess trusts emulated bf16
        load_in_4bit=recipe.model.load_in_4bit,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer = apply_chat_template_choice(tokenizer, recipe.prompt.chat_template)
    if continue_adapter is None:
        kw = lora_kwargs(recipe.lora)
        model = FastLanguageModel.get_peft_model(
            model, r=kw["r"], lora_alpha=kw["lora_alpha"], lora_dropout=kw["lora_dropout"], bias=kw["bias"],
            target_modules=kw["target_modules"], use_rslora=kw["use_rslora"],
            use_gradient_checkpointing="unsloth", random_state=recipe.seed,
            max_seq_length=max_seq_length,
        )
    else:
        # An adapter loaded by from_pretrained is frozen; make its LoRA weights trainable again.
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    return model, tokenizer


def merge_adapter_into_base(base: str, adapter_dir: Path, target: Path, backend: str) -> Path:
    """Write base + adapter merged in 16-bit (float32 on CPU) as a safetensors model folder."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(adapter_dir), load_in_4bit=True)
        model.save_pretrained_merged(str(tmp), tokenizer, save_method="merged_16bit")
    else:
        from peft import PeftModel

        tokenizer = load_tokenizer(base)
        model = load_hf_model(base, load_in_4bit=False)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        if getattr(model, "hf_quantizer", None) is not None:  # a pre-quantised base (e.g. *-bnb-4bit)
            model = model.dequantize()
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def export_merged(model: Any, tokenizer: Any, backend: str, target: Path, base: str, adapter_dir: Path) -> Path:
    """Optional merged 16-bit export of the final model."""
    if backend == "unsloth":
        model.save_pretrained_merged(str(target), tokenizer, save_method="merged_16bit")
        return target
    return merge_adapter_into_base(base, adapter_dir, target, backend)


def export_gguf(model: Any, tokenizer: Any, backend: str, target: Path, quantization: str) -> Path:
    if backend != "unsloth":
        raise RuntimeError("GGUF export uses Unsloth's save_pretrained_gguf and needs the unsloth backend (GPU)")
    model.save_pretrained_gguf(str(target), tokenizer, quantization_method=quantization)
    return target
