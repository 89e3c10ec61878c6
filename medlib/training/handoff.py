"""The handoff: how stage 2 starts from stage 1, what it trains against, and what of stage 1 survives.

A stage-1 QLoRA run ends as a 4-bit base W' (NF4, already on the 4-bit grid when the checkpoint is
pre-quantised, as `unsloth/...-bnb-4bit` and medlib:smollm2-bnb-4bit are) plus an adapter ΔW1.
`handoff:` in a stage-2 recipe picks how stage 2 goes on from there; every handoff ships exactly the
weights its stage 2 trained against, plus its adapter (run_metadata.json -> trained_against):

| handoff | stage 2 trains a fresh LoRA on | the run ships |
|---|---|---|
| requantized_merge | NF4(16-bit(W' + ΔW1)): the merged Med-Mix reloaded in 4-bit (the authors') | the stage-2 adapter on `<stage-1 run>/merged_16bit`, loaded in 4-bit |
| stacked | W' + ΔW1, the stage-1 LoRA kept frozen beside it (medlib's correction) | one LoRA of rank r1 + r2 on the original base (exactly that sum) |
| continue | (no fresh LoRA: the stage-1 adapter trains on) | the continued adapter on the original base |

requantized_merge rounds W' + ΔW1 back onto the 4-bit grid, so a small ΔW1 can be mostly lost before
stage 2 starts. `measure_requantization` says how much survives, per module type, for every stage-1
run (run_metadata.json -> handoff_measure), and `medlib handoff measure` does the same for published weights.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from medlib.runs import NF4_BLOCKSIZE, merge_dtype

log = logging.getLogger(__name__)

HANDOFFS = ("requantized_merge", "stacked", "continue")
STAGE1_ADAPTER = "stage1"            # the frozen stage-1 LoRA's name under `stacked`


def nf4_roundtrip(weight: Any) -> Any:
    """weight quantised to NF4 (double quantisation, blocks of 64) and read back, in float32."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                       compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state).float()


def base_weight(layer: Any) -> Any:
    """A linear layer's weight in float32: de-quantised exactly when it is 4-bit."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


def lora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """(module name, peft LoRA layer) for every adapted linear layer of a peft model."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and len(module.lora_A):
            yield name, module


def lora_delta(layer: Any, adapter: str = "default") -> Any:
    """ΔW = scaling · B · A of one LoRA layer, in float32."""
    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
    return layer.scaling[adapter] * (b @ a)


class _Sums:
    def __init__(self) -> None:
        self.n = 0
        self.w2 = self.d2 = self.kept_dot = self.kept2 = self.cast_dot = 0.0
        self.ratios: list[float] = []

    def add(self, w: Any, delta: Any, cast: Any, requantized: Any) -> None:
        kept, kept_cast = requantized - w, cast - w
        d2 = float((delta * delta).sum())
        self.n += 1
        self.w2 += float((w * w).sum())
        self.d2 += d2
        self.kept_dot += float((kept * delta).sum())
        self.kept2 += float((kept * kept).sum())
        self.cast_dot += float((kept_cast * delta).sum())
        self.ratios.append(math.sqrt(d2) / max(math.sqrt(float((w * w).sum())), 1e-30))

    def summary(self) -> dict[str, Any]:
        ratios = sorted(self.ratios)
        d2 = max(self.d2, 1e-30)
        return {"matrices": self.n,
                "delta_over_weight": math.sqrt(self.d2 / max(self.w2, 1e-30)),
                "delta_over_weight_median": ratios[len(ratios) // 2] if ratios else None,
                "kept_after_16bit_cast": self.cast_dot / d2,
                "kept_share": self.kept_dot / d2,
                "kept_cosine": self.kept_dot / max(math.sqrt(self.kept2 * d2), 1e-30)}


def requantization_of(pairs: Iterator[tuple[str, Any, Any]], dtype: Any) -> dict[str, Any]:
    """How much of ΔW survives W' + ΔW cast to `dtype` and re-quantised to NF4, from (name, W', ΔW) pairs.

    kept = NF4(dtype(W' + ΔW)) - W'. `kept_share` is kept's projection on ΔW (<kept, ΔW> / |ΔW|²: 1 = all of
    ΔW survives, 0 = none), `kept_cosine` their cosine (rounding noise lowers it), `kept_after_16bit_cast` the
    same projection after the cast alone, `delta_over_weight` |ΔW| / |W'| (sums of squares over the matrices).
    Reported per module type (q_proj, ...) and over all matrices."""
    by_type: dict[str, _Sums] = defaultdict(_Sums)
    total = _Sums()
    for name, w, delta in pairs:
        cast = (w + delta).to(dtype).float()
        requantized = nf4_roundtrip(cast.to(w.device))
        for sums in (by_type[name.rsplit(".", 1)[-1]], total):
            sums.add(w, delta, cast, requantized)
    return {"merge_dtype": str(dtype).replace("torch.", ""), "quantization": f"nf4, double quantisation, blocks of {NF4_BLOCKSIZE}",
            "all": total.summary(), "by_module": {k: v.summary() for k, v in sorted(by_type.items())}}


def measure_requantization(model: Any, dtype: Any) -> dict[str, Any]:
    """requantization_of for a trained peft model: W' its (de-quantised) base weights, ΔW its LoRA."""
    import torch

    with torch.no_grad():
        return requantization_of(((name, base_weight(layer.base_layer), lora_delta(layer))
                                  for name, layer in lora_layers(model)), dtype)


class requantized_weights:
    """While open, each adapted layer's base weight is NF4(dtype(W' + ΔW)) and the adapter is off: the
    model is the requantised merge, in place and in 4-bit (no merged copy in memory or on disk)."""

    def __init__(self, model: Any, dtype: Any) -> None:
        self.model, self.dtype, self.saved = model, dtype, []

    def __enter__(self) -> Any:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        import torch

        with torch.no_grad():
            for _, layer in lora_layers(self.model):
                base = layer.base_layer
                weight = base.weight
                merged = (base_weight(base) + lora_delta(layer)).to(self.dtype)
                if getattr(weight, "quant_state", None) is not None:
                    packed, state = bnbf.quantize_4bit(merged.to(weight.quant_state.dtype).contiguous(),
                                                       blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                                       compress_statistics=True)
                    new = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCKSIZE,
                                            compress_statistics=True, quant_type="nf4", module=base,
                                            bnb_quantized=True)
                else:  # a float base: the authors' reload in 4-bit, read back as float
                    new = torch.nn.Parameter(nf4_roundtrip(merged.float()).to(weight.dtype), requires_grad=False)
                self.saved.append((base, weight))
                base.weight = new
        self.adapters_off = self.model.disable_adapter()
        self.adapters_off.__enter__()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.adapters_off.__exit__(*exc)
        for base, weight in self.saved:
            base.weight = weight
        self.saved.clear()


def validation_losses(trainer: Any, dtype: Any) -> dict[str, float | None]:
    """Stage-1 validation loss of (a) the trained model, (b) its requantised merge, (c) the base model:
    a continuous measure of what the handoff keeps, which accuracy at 135M parameters cannot show."""
    if trainer.eval_dataset is None:
        return {"trained": None, "requantized_merge": None, "base": None}
    model = trainer.model
    trained = trainer.evaluate(metric_key_prefix="handoff")["handoff_loss"]
    with requantized_weights(model, dtype):
        merged = trainer.evaluate(metric_key_prefix="handoff")["handoff_loss"]
    with model.disable_adapter():
        base = trainer.evaluate(metric_key_prefix="handoff")["handoff_loss"]
    return {"trained": trained, "requantized_merge": merged, "base": base}


def measure_stage1(trainer: Any, precision: str) -> dict[str, Any]:
    """What every stage-1 run records about its handoff (run_metadata.json -> handoff)."""
    dtype = merge_dtype(precision)
    out = measure_requantization(trainer.model, dtype)
    out["validation_loss"] = validation_losses(trainer, dtype)
    loss = out["validation_loss"]
    if None not in loss.values() and loss["base"] != loss["trained"]:
        # the share of stage 1's validation-loss gain over the base that the requantised merge keeps
        out["validation_gain_kept"] = (loss["base"] - loss["requantized_merge"]) / (loss["base"] - loss["trained"])
    return out


# ------------------------------------------------------------------- published checkpoints, streamed


QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def checkpoint_shards(name: str) -> list[Path]:
    """The safetensors files of a local folder, or of a Hub repository (downloaded one by one, as used)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} holds no .safetensors file")
        return files
    from huggingface_hub import hf_hub_download, list_repo_files

    names = sorted(f for f in list_repo_files(name) if f.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"Hub repository {name} holds no .safetensors file")
    return [Path(hf_hub_download(name, f)) for f in names]


class _QuantizedCheckpoint:
    """Reads a pre-quantised (bitsandbytes NF4) checkpoint one matrix at a time, de-quantised exactly."""

    def __init__(self, shards: list[Path]) -> None:
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                self.where.update({key: shard for key in f.keys()})

    def is_quantized(self, key: str) -> bool:
        return f"{key}.quant_state.bitsandbytes__nf4" in self.where

    def tensor(self, key: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def dequantized(self, key: str) -> Any:
        import bitsandbytes.functional as bnbf

        if not self.is_quantized(key):
            return self.tensor(key).float()
        state = bnbf.QuantState.from_dict({f"weight.{s}": self.tensor(f"{key}.{s}") for s in QUANT_SUFFIXES
                                           if f"{key}.{s}" in self.where}, device="cpu")
        return bnbf.dequantize_4bit(self.tensor(key), state).float()


def measure_published(base: str, merged: str, modules: tuple[str, ...] = ()) -> dict[str, Any]:
    """ΔW of a published merged 16-bit model against the pre-quantised base it was trained on (W' = the base
    de-quantised exactly), and how much of ΔW its reload in 4-bit keeps: requantization_of, streamed one
    matrix at a time (peak memory: a few matrices, not a model). Only matrices the base holds in 4-bit count
    (the adapted linear layers); `modules` keeps only names ending in one of them. A matrix of the base that
    the merged model lacks, or one of another shape, is an error that names it."""
    import torch
    from safetensors import safe_open

    quantized = _QuantizedCheckpoint(checkpoint_shards(base))
    expected = {k[: -len(".weight")] for k in quantized.where if k.endswith(".weight") and quantized.is_quantized(k)}
    expected = {n for n in expected if not modules or n.endswith(modules)}
    merged_shards = checkpoint_shards(merged)
    with safe_open(str(merged_shards[0]), framework="pt") as f:
        dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    seen: list[str] = []

    def pairs() -> Iterator[tuple[str, Any, Any]]:
        for shard in merged_shards:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    name = key[: -len(".weight")]
                    if not key.endswith(".weight") or name not in expected:
                        continue
                    new, w = f.get_tensor(key), quantized.dequantized(key)
                    if w.shape != new.shape:
                        raise ValueError(f"{shard.name}: {key} has shape {tuple(new.shape)}, the base's {tuple(w.shape)}")
                    seen.append(name)
                    yield name, w, new.float() - w

    report = requantization_of(pairs(), dtype)
    missing = sorted(expected - set(seen))
    if missing:
        raise ValueError(f"{merged}: {len(missing)} of the base's 4-bit matrices are missing, e.g. {missing[0]}.weight")
    report.update({"base": base, "merged": merged})
    return report
