"""Fold a stage-1 and a stage-2 LoRA adapter into ONE adapter on the original base.

Under handoff `stacked` stage 2 trains a fresh adapter B2·A2 while the stage-1 adapter B1·A1 stays
active and frozen on the same 4-bit base, so the model that trained is W' + s1·B1·A1 + s2·B2·A2: exactly a
LoRA of rank r1 + r2 with A = [A1; A2] and B = [s1·B1, s2·B2] at scale 1 (lora_alpha = r, no rsLoRA).
Shipping that single adapter means `PeftModel.from_pretrained(base, run_dir)` gives Med-Nirvana, the
model that trained, with no hidden dependency on the stage-1 folder.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _scale(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def combine_adapters(first: Path, second: Path, target: Path, base_model: str) -> Path:
    from safetensors.torch import load_file, save_file

    cfg1 = json.loads((Path(first) / ADAPTER_CONFIG).read_text())
    cfg2 = json.loads((Path(second) / ADAPTER_CONFIG).read_text())
    for cfg, where in ((cfg1, first), (cfg2, second)):
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError(f"{where}: adapters with per-layer rank/alpha patterns cannot be combined")
    w1, w2 = load_file(str(Path(first) / ADAPTER_WEIGHTS)), load_file(str(Path(second) / ADAPTER_WEIGHTS))
    if set(w1) != set(w2):
        raise ValueError(f"adapters {first} and {second} adapt different modules; cannot combine")
    s1, s2 = _scale(cfg1), _scale(cfg2)
    out = {}
    for key, a in w1.items():
        b = w2[key]
        if "lora_A" in key:
            out[key] = __import__("torch").cat([a.float(), b.float()], dim=0).to(a.dtype)
        elif "lora_B" in key:
            out[key] = __import__("torch").cat([s1 * a.float(), s2 * b.float()], dim=1).to(a.dtype)
        else:
            raise ValueError(f"{first}: unexpected adapter tensor {key!r} (only LoRA A/B can be combined)")
    rank = int(cfg1["r"]) + int(cfg2["r"])
    cfg = dict(cfg2, r=rank, lora_alpha=rank, use_rslora=False, base_model_name_or_path=base_model)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    save_file(out, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (target / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    return target


def copy_adapter(src: Path, dst: Path) -> None:
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copy2(Path(src) / name, Path(dst) / name)
