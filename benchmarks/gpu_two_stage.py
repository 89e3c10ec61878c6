"""Both stages on the unsloth backend, on a GPU: stage 1, stage 2 with `init: merge` and `init: continue`,
the merged 16-bit export, and whether the shipped stage-2 adapter reproduces that export.

Like train_gpu_8b.py this runs on a machine that cannot download anything, so the model is
Llama-3.1-8B-shaped (hidden 4096, MLP 14336, 32/8 heads, vocab 128,256) with RANDOM weights and fewer
layers (--layers, default 4) to keep the merges quick; loss values mean nothing, the code path does.
Everything goes through `medlib.training.train` with the paper recipes, pointed at the local mixtures.

    # here (CPU): the local mixtures and a tokenizer, in a folder that travels to the GPU machine
    medlib data build --profile local --stage 1 && medlib data build --profile local --stage 2
    cp -r outputs/local/data .whl/mix && mkdir -p .whl/tok
    cp ~/.cache/medlib/models/smollm2-135m-instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .whl/tok/
    # on the GPU machine (requirements-gpu.txt installed)
    python benchmarks/gpu_two_stage.py --mixtures .whl/mix --tokenizer .whl/tok --work /tmp/two_stage

Prints one JSON line per step and a final RESULT line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_gpu_8b import build_model  # noqa: E402


def emit(step: str, **fields) -> dict:
    print(json.dumps({"step": step, **fields}), flush=True)
    return fields


def stage(number: int, work: Path, model_dir: Path, mixtures: Path, steps: int, extra: list[str]) -> Path:
    import torch

    torch.cuda.reset_peak_memory_stats()
    from medlib.config import load_train
    from medlib.training import train

    overrides = [f"model.name={model_dir}", "model.backend=unsloth",
                 f"training.max_steps={steps}", "training.logging_steps=1", "training.eval_steps=5",
                 "training.save_steps=1000", "training.max_eval_samples=16", *extra]
    recipe = load_train("paper", number, overrides)
    started = time.time()
    out = work / ("stage1" if number == 1 else f"stage2_{recipe.init}")
    run_dir = train(recipe, out, mixtures / f"stage{number}", work / "stage1" if number == 2 else None, overwrite=True)
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    losses = [row["loss"] for row in meta_history(run_dir) if "loss" in row]
    emit(f"stage{number}" + (f"_{meta['init']}" if number == 2 else ""), backend=meta["backend"],
         steps=meta["global_step"], seconds=round(time.time() - started, 1), first_loss=losses[0],
         last_loss=losses[-1], memory=meta["memory"], exports=meta["exports"], fallbacks=meta["fallbacks"],
         files=sorted(p.name for p in run_dir.iterdir()))
    return run_dir


def meta_history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "log_history.json").read_text())


def logits_agreement(model_dir: Path, stage2: Path, prompt: str) -> dict:
    """Base + the shipped (combined) stage-2 adapter vs the merged 16-bit export, both in bf16, no 4-bit."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stage2)
    ids = tok(prompt, return_tensors="pt").input_ids.cuda()

    def logits(model):
        with torch.no_grad():
            return model.to("cuda").eval()(ids).logits.float()[0]

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    base_logits = logits(base)
    adapted = logits(PeftModel.from_pretrained(base, str(stage2)))
    merged = logits(AutoModelForCausalLM.from_pretrained(stage2 / "merged_16bit", dtype=torch.bfloat16))

    def rel(a, b):
        return round(float((a - b).norm() / b.norm()), 4)

    return {"tokens": ids.shape[1], "rel_diff_adapter_vs_merged": rel(adapted, merged),
            "rel_diff_base_vs_merged": rel(base_logits, merged),
            "top1_agreement_adapter_vs_merged": round(float((adapted.argmax(-1) == merged.argmax(-1)).float().mean()), 3),
            "top1_agreement_base_vs_merged": round(float((base_logits.argmax(-1) == merged.argmax(-1)).float().mean()), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixtures", type=Path, required=True, help="folder with stage1/ and stage2/ mixtures")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/two_stage"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)

    import unsloth  # noqa: F401  (first, so it patches transformers and TRL)

    model_dir = a.work / "base"
    build_model(model_dir, a.tokenizer, a.layers)
    stage(1, a.work, model_dir, a.mixtures, a.steps, [])
    merged = stage(2, a.work, model_dir, a.mixtures, a.steps,
                   ["init=merge", "training.export_merged_16bit=true"])
    stage(2, a.work, model_dir, a.mixtures, a.steps, ["init=continue"])
    agreement = logits_agreement(model_dir, merged, "Which vitamin deficiency causes scurvy?")
    print("RESULT " + json.dumps({"layers": a.layers, "steps": a.steps, **agreement}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
