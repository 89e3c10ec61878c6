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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from medlib.config import LoraSettings, TrainRecipe
from medlib.models import cuda_available, keep_4bit_cpu_numerics, load_hf_model, load_tokenizer, torch_dtype_for
from medlib.prompts import apply_chat_template_choice
from medlib.training.handoff import STAGE1_ADAPTER

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
                      gradient_checkpointing: bool, precision: str = "fp32",
                      frozen_adapter: Path | None = None) -> tuple[Any, Any]:
    """(peft model with trainable LoRA, tokenizer). continue_adapter: keep training that adapter;
    frozen_adapter: keep that adapter active but frozen beside the fresh one (handoff `stacked`).
    precision (medlib.models.training_precision) sets the compute dtype, so the model and the trainer agree."""
    dtype = torch_dtype_for(precision)
    if backend == "unsloth":
        return _load_unsloth(recipe, model_path, continue_adapter, dtype)
    return _load_hf(recipe, model_path, continue_adapter, gradient_checkpointing, dtype, frozen_adapter)


def _load_hf(recipe, model_path, continue_adapter, gradient_checkpointing, dtype, frozen_adapter=None):
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
    elif frozen_adapter is not None:
        model = stack_fresh_adapter(model, frozen_adapter, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(recipe.lora)))
    else:
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(recipe.lora)))
    return model, tokenizer


def stack_fresh_adapter(model: Any, frozen_adapter: Path, config: Any) -> Any:
    """base + the frozen adapter (named handoff.STAGE1_ADAPTER) + a fresh trainable one ("default"), both
    active: the model computes W' + ΔW1 + ΔW2 and only ΔW2 learns."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(frozen_adapter), adapter_name=STAGE1_ADAPTER, is_trainable=False)
    model.add_adapter("default", config)
    model.base_model.set_adapter([STAGE1_ADAPTER, "default"])
    for name, param in model.named_parameters():
        param.requires_grad_(".default." in name and "lora_" in name)
    return model


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


def export_gguf(model: Any, tokenizer: Any, backend: str, target: Path, quantization: str) -> Path:
    if backend != "unsloth":
        raise RuntimeError("GGUF export uses Unsloth's save_pretrained_gguf and needs the unsloth backend (GPU)")
    model.save_pretrained_gguf(str(target), tokenizer, quantization_method=quantization)
    return target
