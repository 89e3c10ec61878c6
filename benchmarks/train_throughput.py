"""Training throughput on the local profile: plain padding vs TRL packing (bfd, padding-free).

Runs the same number of optimizer steps of `medlib.training.train` (stage-1 local recipe, hf backend,
SmolLM2-135M NF4 + LoRA) once per batching mode (padding; padding-free: the batch's 4 samples
concatenated, no pads, the paper's samples per step; TRL bfd packing into max_seq_length rows), in one process, and prints for each mode the
non-pad tokens per second and the fraction of non-pad tokens in the batches the trainer actually
built, then the ratios against plain padding. Timings on a shared CPU are noisy: compare the ratios
printed by one run, not absolute numbers across runs.

    python benchmarks/train_throughput.py                 # 8 steps per mode (first 2 not timed)
    python benchmarks/train_throughput.py --steps 12 --json out.json

Targets (issue 3): packing >= 0.95 non-pad, >= 1.5x the tokens/s of plain padding.

    python benchmarks/train_throughput.py --limit     # issue 14: against the matmul-bound limit, with peak RSS

`--limit` trains the local stage-1 recipe (padding-free, its default) twice, each in its own process so
that peak RSS is its own: QLoRA (NF4 base, the recipe) and LoRA on the float32 base. In the same run
it times the model's own linear layers as bare float32 matmuls at the step's token count (forward, and
the same again for the backward pass's input gradients; a frozen base has no weight gradients), which
gives the tokens/s a step could reach if it did nothing else. Targets (issue 14): >= 60 % of that
limit and peak RSS <= 2 GiB.
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

    from medlib.config import load_train
    from medlib.pipeline import ensure_mixture, layout
    from medlib.training import train

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

    recipe = load_train("local", 1, [
        f"training.max_steps={steps}", "training.logging_steps=1", f"training.eval_steps={10**6}",
        f"training.save_steps={10**6}", "training.max_eval_samples=0", *overrides,
    ])
    meter = Meter()
    mixture = ensure_mixture(recipe, layout("local"))  # outputs/local/data/stage1, built once
    run_dir = train(recipe, workdir / mode, mixture, overwrite=True, callbacks=[meter])
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    times, tokens = meter.times[warmup:], meter.tokens[warmup:]
    return {
        "mode": mode, "steps_timed": len(times), "s_per_step": round(statistics.median(times), 3),
        "nonpad_tokens_per_step": round(sum(tokens) / len(tokens), 1),
        "tokens_per_s": round(sum(tokens) / sum(times), 1),
        "nonpad_fraction": round(meter.real / meter.slots, 4),
        "backend": meta["backend"], "device": meta["device"], "model": meta["base_model"],
    }


QUANTISATION_MODES = {"qlora_nf4": ["model.load_in_4bit=true"], "lora_float32": ["model.load_in_4bit=false"]}


def matmul_bound_tokens_per_s(tokens: int, repeats: int = 3) -> dict:
    """Tokens/s if a step were only the model's linear layers as bare float32 matmuls (forward + input grads)."""
    import torch
    from transformers import AutoConfig

    from medlib.models import SMOLLM2, resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(SMOLLM2))
    d, ff, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    kv_dim = d // heads * kv
    shapes = [(d, d), (d, kv_dim), (d, kv_dim), (d, d), (d, ff), (d, ff), (ff, d)] * cfg.num_hidden_layers
    shapes.append((d, cfg.vocab_size))  # the LM head
    weights = {shape: torch.randn(*shape) for shape in set(shapes)}
    inputs = {k: torch.randn(tokens, k) for k in {shape[0] for shape in shapes}}
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for shape in shapes:
            inputs[shape[0]] @ weights[shape]
        best = min(best, time.perf_counter() - started)
    flops = 2 * tokens * sum(k * n for k, n in shapes)
    return {"tokens": tokens, "forward_matmul_s": round(best, 4), "gflops_per_s": round(flops / best / 1e9, 1),
            "limit_tokens_per_s": round(tokens / (2 * best), 1), "threads": torch.get_num_threads()}


def one_mode(mode: str, steps: int, warmup: int) -> dict:
    """One quantisation mode in this process; adds its peak RSS."""
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        result = measure(mode, ["training.padding_free=true", *QUANTISATION_MODES[mode]], steps, warmup, Path(tmp))
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


def against_the_limit(steps: int, warmup: int) -> list[dict]:
    import subprocess

    results = []
    for mode in QUANTISATION_MODES:
        done = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(steps), "--warmup", str(warmup)],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    limit = matmul_bound_tokens_per_s(round(results[0]["nonpad_tokens_per_step"]))
    print(f"\nlocal stage-1 recipe, padding-free, {results[0]['model']} on {results[0]['device']}")
    print(f"matmul-bound limit at {limit['tokens']} tokens/step: {limit['limit_tokens_per_s']} tokens/s "
          f"({limit['gflops_per_s']} GFLOP/s float32, {limit['threads']} threads)")
    print(f"{'mode':<13} {'s/step':>7} {'tokens/s':>9} {'of limit':>9} {'peak RSS':>9}")
    for r in results:
        r["fraction_of_limit"] = round(r["tokens_per_s"] / limit["limit_tokens_per_s"], 3)
        r["limit"] = limit
        print(f"{r['mode']:<13} {r['s_per_step']:>7} {r['tokens_per_s']:>9} {r['fraction_of_limit']:>9.1%} "
              f"{r['peak_rss_gib']:>7} GiB")
    for r in results:
        print(f"targets for {r['mode']}: >= 60% of the limit -> {r['fraction_of_limit']:.1%} "
              f"({'met' if r['fraction_of_limit'] >= 0.6 else 'NOT met'}); peak RSS <= 2 GiB -> {r['peak_rss_gib']} GiB "
              f"({'met' if r['peak_rss_gib'] <= 2 else 'NOT met'})")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--limit", action="store_true", help="QLoRA and float LoRA against the matmul-bound limit, peak RSS")
    parser.add_argument("--one", choices=QUANTISATION_MODES, help=argparse.SUPPRESS)  # used by --limit
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    if args.one:
        print(json.dumps(one_mode(args.one, args.steps, args.warmup)))
        return 0
    if args.limit:
        results = against_the_limit(args.steps, args.warmup)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return 0
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
