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

`--limit` trains the local stage-1 recipe in separate processes (peak RSS is each one's own): QLoRA as the
recipe stands (one sample per micro-batch x 4, LM head on labelled positions only, the checkpoint file let
go), the same with jemalloc preloaded, LoRA on the float32 base, and QLoRA as it was before issue 14's
changes (batch 4 in one micro-batch, TRL's every-position LM head on CPU, the checkpoint kept mapped). In the
same run it times the model's own linear layers as bare float32 matmuls at the step's token count (forward,
and the same again for the backward pass's input gradients; a frozen base has no weight gradients): `full`
projects every position through the LM head, `needed` only the labelled ones, which is all a step must do.
Targets (issue 14): >= 60 % of the limit (judged against `needed`, the stricter) and peak RSS <= 2 GiB.
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
    from medlib.data.mixtures import ensure_mixture
    from medlib.runs import layout
    from medlib.training import train

    class Meter(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.real, self.slots = [], [], 0, 0

        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            self.labelled = 0
            for i, batch in enumerate(train_dataloader):  # the micro-batches the trainer builds for `steps` steps
                if i >= steps * args.gradient_accumulation_steps:
                    break
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                self.real += int(mask.sum()) if mask is not None else ids.numel()  # padding-free: no pad at all
                self.slots += ids.numel()
                self.labelled += int((batch["labels"][:, 1:] != -100).sum())  # positions whose next token is trained

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
        "nonpad_fraction": round(meter.real / meter.slots, 4), "labelled_fraction": round(meter.labelled / meter.real, 4),
        "batch": meta["fidelity"]["batch"], "lm_head_positions": meta.get("lm_head_positions"),
        "backend": meta["backend"], "device": meta["device"], "model": meta["base_model"],
        "allocator": meta["memory"]["allocator"],
    }


# The local stage-1 recipe as it stands, its float-LoRA variant, and the recipe as it was before issue 14's
# changes (batch 4 in one micro-batch, TRL's every-position LM head on CPU, the checkpoint kept mapped).
LIMIT_MODES = {
    "qlora_nf4": ["model.load_in_4bit=true"],
    "qlora_nf4_jemalloc": ["model.load_in_4bit=true"],  # the same, with jemalloc preloaded (`make reproduce` does)
    "lora_float32": ["model.load_in_4bit=false"],
    "qlora_nf4_before": ["model.load_in_4bit=true", "training.per_device_train_batch_size=4",
                         "training.gradient_accumulation_steps=1"],
}


def matmul_bound_tokens_per_s(tokens: int, labelled: int, repeats: int = 3) -> dict:
    """Tokens/s if a step were only the model's linear layers as bare float32 matmuls (forward + input grads):
    `full` projects every position through the LM head, `needed` only the `labelled` ones (what a step must do)."""
    import torch
    from transformers import AutoConfig

    from medlib.models import SMOLLM2, resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(SMOLLM2))
    d, ff, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    kv_dim = d // heads * kv
    decoder = [(d, d), (d, kv_dim), (d, kv_dim), (d, d), (d, ff), (d, ff), (ff, d)] * cfg.num_hidden_layers
    head = (d, cfg.vocab_size)

    def best_time(rows: int, shapes: list[tuple[int, int]]) -> float:
        weights = {shape: torch.randn(*shape) for shape in set(shapes)}
        inputs = {k: torch.randn(rows, k) for k in {shape[0] for shape in shapes}}
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for shape in shapes:
                inputs[shape[0]] @ weights[shape]
            best = min(best, time.perf_counter() - started)
        return best

    decoder_s, head_all_s, head_labelled_s = best_time(tokens, decoder), best_time(tokens, [head]), best_time(labelled, [head])
    flops = 2 * tokens * (sum(k * n for k, n in decoder) + head[0] * head[1])
    return {"tokens": tokens, "labelled": labelled, "threads": torch.get_num_threads(),
            "gflops_per_s": round(flops / (decoder_s + head_all_s) / 1e9, 1),
            "lm_head_share_of_full": round(head_all_s / (decoder_s + head_all_s), 3),
            "full_limit_tokens_per_s": round(tokens / (2 * (decoder_s + head_all_s)), 1),
            "needed_limit_tokens_per_s": round(tokens / (2 * (decoder_s + head_labelled_s)), 1)}


def one_mode(mode: str, steps: int, warmup: int) -> dict:
    """One mode in this process; adds its peak RSS."""
    import contextlib
    import resource

    if mode.endswith("_before"):
        import medlib.models
        import medlib.training.run

        medlib.training.run.lm_head_on_labelled_positions = lambda: contextlib.nullcontext(False)
        medlib.models.release_checkpoint_mapping = lambda model: 0
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(mode, ["training.padding_free=true", *LIMIT_MODES[mode]], steps, warmup, Path(tmp))
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux
    return result


def against_the_limit(steps: int, warmup: int) -> list[dict]:
    import subprocess

    import glob
    import os

    jemalloc = sorted(glob.glob("/usr/lib/*/libjemalloc.so.2"))
    results = []
    for mode in LIMIT_MODES:
        env = dict(os.environ)
        if mode.endswith("_jemalloc"):
            if not jemalloc:
                print(f"{mode}: skipped, no libjemalloc.so.2 (apt-get install libjemalloc2)")
                continue
            env["LD_PRELOAD"] = jemalloc[0]
        done = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(steps), "--warmup", str(warmup)],
                              capture_output=True, text=True, check=True, env=env)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    tokens = round(results[0]["nonpad_tokens_per_step"])
    limit = matmul_bound_tokens_per_s(tokens, round(tokens * results[0]["labelled_fraction"]))
    print(f"\nlocal stage-1 recipe, {results[0]['model']} on {results[0]['device']}, {steps - warmup} timed steps per mode")
    print(f"matmul-bound limits at {limit['tokens']} tokens/step ({limit['gflops_per_s']} GFLOP/s float32, "
          f"{limit['threads']} threads): full {limit['full_limit_tokens_per_s']} tokens/s (LM head at every position, "
          f"{limit['lm_head_share_of_full']:.0%} of it); needed {limit['needed_limit_tokens_per_s']} tokens/s "
          f"(LM head at the {limit['labelled']} labelled positions only)")
    print(f"{'mode':<17} {'batch':>6} {'LM head':>14} {'s/step':>7} {'tokens/s':>9} {'of full':>8} {'of needed':>10} {'peak RSS':>9}")
    for r in results:
        r["limit"] = limit
        r["fraction_of_full_limit"] = round(r["tokens_per_s"] / limit["full_limit_tokens_per_s"], 3)
        r["fraction_of_needed_limit"] = round(r["tokens_per_s"] / limit["needed_limit_tokens_per_s"], 3)
        print(f"{r['mode']:<17} {r['batch']:>6} {str(r['lm_head_positions']):>14.14} {r['s_per_step']:>7} {r['tokens_per_s']:>9} "
              f"{r['fraction_of_full_limit']:>8.1%} {r['fraction_of_needed_limit']:>10.1%} {r['peak_rss_gib']:>5} GiB")
    for r in results:
        print(f"targets for {r['mode']}: >= 60% of the needed limit (the stricter) -> {r['fraction_of_needed_limit']:.1%} "
              f"({'met' if r['fraction_of_needed_limit'] >= 0.6 else 'NOT met'}); peak RSS <= 2 GiB -> {r['peak_rss_gib']} GiB "
              f"({'met' if r['peak_rss_gib'] <= 2 else 'NOT met'})")
    by_mode = {r["mode"]: r for r in results}
    recipe, before = by_mode["qlora_nf4"], by_mode["qlora_nf4_before"]
    print(f"tokens/s, recipe / before: {recipe['tokens_per_s'] / before['tokens_per_s']:.2f}x; "
          f"peak RSS, recipe / before: {recipe['peak_rss_gib'] / before['peak_rss_gib']:.2f}x")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--limit", action="store_true", help="QLoRA and float LoRA against the matmul-bound limit, peak RSS")
    parser.add_argument("--one", choices=LIMIT_MODES, help=argparse.SUPPRESS)  # used by --limit
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
