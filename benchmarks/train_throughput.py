"""Training throughput on the local profile: plain padding vs TRL packing (bfd, padding-free).

Runs the same number of optimizer steps of `medlib.train.train` (stage-1 local recipe, hf backend,
SmolLM2-135M NF4 + LoRA) once per batching mode (padding; padding-free: the batch's 4 samples
concatenated, no pads, the paper's samples per step; TRL bfd packing into max_seq_length rows), in one process, and prints for each mode the
non-pad tokens per second and the fraction of non-pad tokens in the batches the trainer actually
built, then the ratios against plain padding. Timings on a shared CPU are noisy: compare the ratios
printed by one run, not absolute numbers across runs.

    python benchmarks/train_throughput.py                 # 8 steps per mode (first 2 not timed)
    python benchmarks/train_throughput.py --steps 12 --json out.json

Targets (issue 3): packing >= 0.95 non-pad, >= 1.5x the tokens/s of plain padding.
Note: a packed step holds more samples (rows of up to max_seq_length), so it is not the paper's
batching; the recipes keep `packing: false` and this benchmark reports what packing would buy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "padding": ["training.packing=false", "training.padding_free=false"],
    "padding_free": ["training.packing=false", "training.padding_free=true"],  # same 4 samples a step, no pads
    "packing_bfd": ["training.packing=true"],
}


def measure(mode: str, overrides: list[str], steps: int, warmup: int, workdir: Path) -> dict:
    from transformers import TrainerCallback

    import medlib.train as mt

    class Meter(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.real, self.slots = [], [], 0, 0

        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            for i, batch in enumerate(train_dataloader):  # the batches the trainer builds, first `steps` of them
                if i >= steps:
                    break
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                self.real += int(mask.sum()) if mask is not None else ids.numel()  # padding-free: no pad at all
                self.slots += ids.numel()

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.seen0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(state.num_input_tokens_seen - self.seen0)

    recipe = mt.load_recipe_for(1, "local", [
        f"training.max_steps={steps}", "training.logging_steps=1", f"training.eval_steps={10**6}",
        f"training.save_steps={10**6}", "training.max_eval_samples=0", *overrides,
    ])
    meter = Meter()
    run_dir = mt.train(recipe, out_dir=workdir / mode, overwrite=True, callbacks=[meter])
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    times, tokens = meter.times[warmup:], meter.tokens[warmup:]
    return {
        "mode": mode, "steps_timed": len(times), "s_per_step": round(statistics.median(times), 3),
        "nonpad_tokens_per_step": round(sum(tokens) / len(tokens), 1),
        "tokens_per_s": round(sum(tokens) / sum(times), 1),
        "nonpad_fraction": round(meter.real / meter.slots, 4),
        "backend": meta["backend"], "device": meta["device"], "model": meta["base_model"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, overrides in MODES.items():
            results.append(measure(mode, overrides, args.steps, args.warmup, Path(tmp)))
    base = results[0]
    print(f"\nlocal profile, stage-1 recipe, {base['model']} on {base['device']} ({base['backend']} backend)")
    print(f"{'mode':<12} {'s/step':>8} {'tokens/step':>12} {'tokens/s':>10} {'non-pad':>8} {'x tokens/s':>11}")
    for r in results:
        r["tokens_per_s_ratio"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
        print(f"{r['mode']:<12} {r['s_per_step']:>8} {r['nonpad_tokens_per_step']:>12} {r['tokens_per_s']:>10} "
              f"{r['nonpad_fraction']:>8.3f} {r['tokens_per_s_ratio']:>10}x")
    for r in results[1:]:
        print(f"targets for {r['mode']}: non-pad >= 0.95 -> {r['nonpad_fraction']:.3f} "
              f"({'met' if r['nonpad_fraction'] >= 0.95 else 'NOT met'}); tokens/s >= 1.5x -> "
              f"{r['tokens_per_s_ratio']}x ({'met' if r['tokens_per_s_ratio'] >= 1.5 else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
